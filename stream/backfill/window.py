"""Time windows over a topic: operator times, and the offsets they cover per partition.

Operators think in times (`--since 2h`, `--until 2025-06-01T12:00:00Z`); Kafka stores
offsets. `spans` turns a time window into one half-open offset range per partition with
`offsets_for_times`, which answers "the first offset whose timestamp is at or after T".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from aiokafka.structs import TopicPartition

from stream.checks import parse_duration
from stream.engine.fetch import UNDECODABLE, Undecodable, step_over
from stream.errors import UsageError

__all__ = ["Span", "batches", "parse_age", "parse_time", "spans"]

log = logging.getLogger(__name__)


class Span(NamedTuple):
    """Offsets `start` (included) to `end` (excluded) of one partition."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


def parse_time(text: str, *, option: str, now: datetime | None = None) -> int:
    """Milliseconds since the epoch for RFC 3339 (`2025-06-01T12:00:00Z`), `now`, or an
    age such as `30m`, `2h`, `1d`, `1h30m` (that long before `now`). A bare number is not
    an age here: `20250601` would read as a date to some and as seconds to others."""
    now = now or datetime.now(UTC)
    value = text.strip().lower()
    if value == "now":
        return _millis(now)
    seconds = _age(value)
    if seconds is not None:
        try:
            return _millis(now - timedelta(seconds=seconds))
        except OverflowError:
            return 0  # longer ago than any clock goes: from the start
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not a time: use RFC 3339 (2025-06-01T12:00:00Z) "
            "or an age such as 30m, 2h, 1d"
        ) from None
    if moment.tzinfo is None:
        raise UsageError(f"{option} {text!r} has no time zone: add Z (UTC) or an offset")
    return _millis(moment)


def parse_age(text: str, *, option: str, most: int = 366 * 86400) -> float:
    """Seconds in an age such as `90`, `30m`, `2h`, `1d`, `1h30m` (more than zero, at most
    `most`)."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise UsageError(f"{option} {text!r} is not a duration: use one such as 30m, 2h, 1d")
    if seconds > most:
        raise UsageError(f"{option} {text} is longer than {most // 86400} days")
    return seconds


def _age(value: str) -> float | None:
    """The seconds in `value` when it is a duration with units, else None."""
    if not value[-1:].isalpha():
        return None
    try:
        return parse_duration(value)
    except ValueError:
        return None


def _millis(moment: datetime) -> int:
    return max(0, int(moment.timestamp() * 1000))


async def spans(
    consumer: Any, partitions: list[TopicPartition], since_ms: int | None, until_ms: int | None
) -> dict[TopicPartition, Span]:
    """The offsets of each partition with a timestamp in [since, until); `None` means from
    the oldest retained record, and up to the end as it is now."""
    ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
    starts = await _at(consumer, partitions, since_ms, ends)
    if since_ms is None:
        starts = await consumer.beginning_offsets(partitions)
    stops = await _at(consumer, partitions, until_ms, ends)
    return {tp: Span(starts[tp], max(starts[tp], stops[tp])) for tp in partitions}


async def _at(
    consumer: Any, partitions: list[TopicPartition], ms: int | None, ends: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """The first offset at or after `ms` per partition; the end when no record is that late.
    Capped at `ends`, so records arriving while we ask do not stretch the window."""
    if ms is None:
        return dict(ends)
    found = await consumer.offsets_for_times(dict.fromkeys(partitions, ms))
    return {
        tp: ends[tp] if found.get(tp) is None else min(found[tp].offset, ends[tp])
        for tp in partitions
    }


async def batches(
    consumer: Any,
    bounds: dict[TopicPartition, Span],
    *,
    max_records: int = 500,
    on_undecodable: Callable[[Undecodable], None] | None = None,
) -> AsyncGenerator[list[Any], None]:
    """The records of each span, one partition's fetch at a time, in offset order within a
    partition; it stops at the ends (it never waits for records written later). A record
    the Kafka client cannot decode is stepped over with the rest of its batch, which
    cannot be read past it; each of their offsets in the span is passed to
    `on_undecodable`, one at a time."""
    todo = {tp: span for tp, span in bounds.items() if span.size}
    consumer.assign(list(todo))
    for tp, span in todo.items():
        consumer.seek(tp, span.start)
    expected: dict[TopicPartition, int | None] = {tp: span.start for tp, span in todo.items()}
    while todo:
        bad = None
        try:
            fetched = await consumer.getmany(*todo, timeout_ms=500, max_records=max_records)
        except UNDECODABLE:
            fetched, bad = await step_over(consumer, {tp: expected[tp] for tp in todo})
        for tp, records in fetched.items():
            expected[tp] = records[-1].offset + 1
            inside = [record for record in records if record.offset < todo[tp].end]
            if inside:
                yield inside
        if bad is not None:
            expected[bad.tp] = bad.offset + bad.run
            _report(bad, todo[bad.tp].end, on_undecodable or _warn)
        for tp in list(todo):
            # by position, not by the last record: the span may end on offsets that hold
            # no record (transaction markers, aborted writes)
            if await consumer.position(tp) >= todo[tp].end:
                consumer.pause(tp)
                del todo[tp]


def _report(bad: Undecodable, end: int, to: Callable[[Undecodable], None]) -> None:
    """Each offset `bad` holds before the span's `end`, one at a time."""
    for one in bad.each():
        if one.offset < end:
            to(one)


def _warn(bad: Undecodable) -> None:
    log.warning("skipped %s[%d]@%d: %s", bad.tp.topic, bad.tp.partition, bad.offset, bad.error)
