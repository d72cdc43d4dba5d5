"""Fetching past records the Kafka client cannot decode.

aiokafka reads every header key as UTF-8 while it unpacks a fetch. A key that is not
(any producer can write one; the broker does not check) makes `getmany` raise
`UnicodeDecodeError`, which
- names no partition and no offset;
- throws away the records that call had already taken from other partitions, whose
  positions have moved past them: a caller that just fetched again would skip them;
- leaves the failing partition's position where it was, so every later fetch fails the
  same way, for ever.
Nor can a batch be read past such a record: the broker returns whole batches, and aiokafka
parses each record before it skips those below the position, so a good record that shares
a batch with a bad one is unreadable too.

`step_over` recovers with the consumer's public API: it puts every partition back where
its caller expects the next record, fetches the partitions one at a time to find the one
that fails, then record by record to find the offset, and seeks past the rest of that
record's batch (none of it can be read; the batch's end is in aiokafka's reader when it
raises). The caller gets the good records fetched on the way and the positions of the
bad ones. No record is skipped silently; one that cannot be read is reported by position,
the only thing the client gives away about it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio
from aiokafka import ConsumerRecord, TopicPartition

from stream.engine.partitions import Partition
from stream.errors import UndecodableRecordError
from stream.inflate import MAX_HEADERS, InflatedTooLarge

__all__ = [
    "UNDECODABLE",
    "StandIn",
    "Undecodable",
    "stand_in_for_undecodable",
    "step_over",
    "to_keep",
]

log = logging.getLogger(__name__)

# What aiokafka raises out of `getmany` for a record it cannot decode (a batch that would
# inflate past the bound: `stream.inflate`).
UNDECODABLE = (UnicodeDecodeError, InflatedTooLarge)
# One fetch of one partition is stepped through at most this many records per recovery;
# a culprit further on is found by the next (each recovery makes this much progress).
_MAX_STEPS = 500
# The most offsets one recovery stands in for: a batch that cannot be read may hold
# millions of records (each stand-in ~1 kB until its dead letter is written).
_MAX_RUN = 10_000
_WAIT_S = 2.0  # for one partition's records after a seek (a fetch long-poll is 0.5 s)


class Undecodable(NamedTuple):
    """Where a record the client cannot decode sits, and why it cannot; `run` offsets
    from it cannot be read. `batch`: the first offset of the batch that failed and the one
    after it, when aiokafka's reader showed it (None: the record alone is known). aiokafka
    parses a batch from its start, so it reads nothing past a record it cannot decode,
    nor any of a batch it cannot inflate: the run is the rest of that batch."""

    tp: TopicPartition
    offset: int
    error: str
    run: int = 1
    batch: tuple[int, int] | None = None

    def each(self) -> list[Undecodable]:
        """One per offset, the first as it is."""
        return [self._replace(offset=self.offset + i, run=1) for i in range(self.run)]

    def says(self) -> str:
        """Why the record at `offset` cannot be read, naming where."""
        where = f"{self.tp.topic}[{self.tp.partition}]@{self.offset}"
        if self.batch is None:
            return (
                f"the Kafka client cannot decode the record at {where} ({self.error});"
                " its batch is unreadable past it"
            )
        first, end = self.batch
        return (
            f"the Kafka client cannot read the record at {where} (its batch, @{first} to"
            f" @{end - 1}, cannot be read: {self.error})"
        )


@dataclass
class StandIn(ConsumerRecord):  # type: ignore[misc]
    """A record in place of one the client could not decode: its position, no content.
    `error` says why; the engine hands it to the stage's error path, not its handler."""

    error: UndecodableRecordError

    @classmethod
    def each_of(cls, bad: Undecodable) -> list[StandIn]:
        """One for each offset `bad` says cannot be read."""
        return [
            cls._at(bad.tp.topic, bad.tp.partition, one.offset, one.says()) for one in bad.each()
        ]

    @classmethod
    def instead_of(cls, record: Any, why: str) -> StandIn:
        """In place of a record read but not to be kept (`why` says what is wrong)."""
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        return cls._at(
            record.topic, record.partition, record.offset, f"the record at {where} {why}"
        )

    @classmethod
    def _at(cls, topic: str, partition: int, offset: int, message: str) -> StandIn:
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp=-1,  # unknown
            timestamp_type=0,
            key=None,
            value=None,
            checksum=None,
            serialized_key_size=-1,
            serialized_value_size=-1,
            headers=(),
            error=UndecodableRecordError(message),
        )


def to_keep(record: Any) -> Any:
    """`record`, or a stand-in (a dead letter) for one with more than `MAX_HEADERS`
    headers: each header is a tuple of its own (~100 bytes for 2 on the wire), and a queue
    of such records would hold gigabytes."""
    if len(record.headers) <= MAX_HEADERS:
        return record
    why = f"carries {len(record.headers):,} headers, over {MAX_HEADERS}: it is not read"
    return StandIn.instead_of(record, why)


async def step_over(
    consumer: Any, expected: Mapping[TopicPartition, int | None]
) -> tuple[dict[TopicPartition, list[Any]], Undecodable | None]:
    """After `getmany` raised one of `UNDECODABLE`: records fetched while looking, and the
    bad records found (skipped: the consumer is positioned after their run), if any were.

    `expected` maps each partition to the offset its caller wants next (None: from the
    start of the log, as a consumer that had no position reset to it).
    """
    await _rewind(consumer, expected)
    fetched: dict[TopicPartition, list[Any]] = {}
    for tp, offset in expected.items():
        if not _behind(consumer, tp, offset):
            continue  # nothing there to fetch: asking would only wait
        try:
            records = await _fetch(consumer, tp, max_records=None)
        except UNDECODABLE:
            good, bad = await _narrow(consumer, tp)
            if good:
                fetched[tp] = good
            return fetched, bad
        if records:
            fetched[tp] = records
    return fetched, None


async def stand_in_for_undecodable(
    consumer: Any, partitions: Mapping[TopicPartition, Partition]
) -> dict[TopicPartition, list[Any]]:
    """After `getmany` failed to decode a record: find it, and return what was fetched on
    the way with a stand-in for each offset that cannot be read (`Undecodable.run`), which
    the stage's error path turns into a dead letter. `partitions` are the engine's; each
    is expected to go on from its next offset."""
    # A partition assigned but not set up yet may have lost records too, from its start
    # (set-up seeks it to its committed offset, if any); unless its set-up began, which
    # pauses it: then nothing of it was fetched, and its position is set-up's to set.
    paused = consumer.paused()
    expected: dict[TopicPartition, int | None] = {
        tp: None for tp in consumer.assignment() if tp not in partitions and tp not in paused
    }
    for tp, partition in partitions.items():
        if not partition.revoked:
            expected[tp] = partition.offsets.next_expected
    batch, bad = await step_over(consumer, expected)
    if bad is not None:
        last = bad.offset + bad.run - 1
        log.warning(
            "%s[%d]@%s cannot be read (%s): handing %s to the error path",
            bad.tp.topic,
            bad.tp.partition,
            bad.offset if bad.run == 1 else f"{bad.offset}-{last}",
            bad.error,
            "it" if bad.run == 1 else f"each of the {bad.run:,}",
        )
        batch.setdefault(bad.tp, []).extend(StandIn.each_of(bad))
    return batch


async def _rewind(consumer: Any, expected: Mapping[TopicPartition, int | None]) -> None:
    """Put every partition back where its caller expects the next record."""
    for tp, offset in expected.items():
        try:
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
        except Exception as exc:  # no longer assigned: nothing to put back
            log.debug("not rewinding %s: %s", tp, exc)


def _behind(consumer: Any, tp: TopicPartition, offset: int | None) -> bool:
    """Whether `tp` may hold records from `offset` on, by the last fetch's high watermark
    (a paused partition is not fetched: it holds nothing to find now)."""
    try:
        end = consumer.highwater(tp)
        paused = tp in consumer.paused()
    except Exception:  # no longer assigned
        return False
    if paused:
        return False
    return end is None or end > (offset or 0)  # (a log without a position starts at 0 or later)


async def _narrow(consumer: Any, tp: TopicPartition) -> tuple[list[Any], Undecodable | None]:
    """Step through `tp` one record at a time up to the one that cannot be decoded."""
    good: list[Any] = []
    while len(good) < _MAX_STEPS:
        try:
            records = await _fetch(consumer, tp, max_records=1)
        except UNDECODABLE as exc:
            # aiokafka moves the position only past records it returned: the bad one is
            # there, or at the start of the batch that failed when aiokafka passed over
            # offsets without a record on the way (markers, aborted or compacted ones).
            bad = _unreadable(tp, await consumer.position(tp), exc)
            consumer.seek(tp, bad.offset + bad.run)
            return good, bad
        if not records:
            break
        good += records
    return good, None


async def _fetch(consumer: Any, tp: TopicPartition, *, max_records: int | None) -> list[Any]:
    # A deadline on each call alone: records a call returned are never dropped by a
    # cancellation between calls (their position has already moved on).
    with anyio.move_on_after(_WAIT_S):
        found = await consumer.getmany(tp, timeout_ms=int(_WAIT_S * 500), max_records=max_records)
        return list(found.get(tp, ()))
    return []


def _unreadable(tp: TopicPartition, position: int, exc: BaseException) -> Undecodable:
    """The offsets from `position` on that cannot be read: the rest of the batch `exc`
    came out of (at most `_MAX_RUN`), or the one at `position` when that batch is not
    known. Stepping a record at a time, a batch of 200,000 small records past the
    inflation bound took hours. (Offsets a compaction emptied inside that batch are stood
    in for too: nothing tells them from records.)"""
    batch = _failed_batch(exc)
    if batch is None:
        _warn_unseen_batch()
        return Undecodable(tp, position, _describe(exc))
    first, end = batch
    # The position may be before the batch (aiokafka passed over markers, aborted or
    # compacted offsets without moving it: nothing to read there), or inside it, past
    # the record that failed (the run starts where its caller is).
    first = max(first, position)
    if end <= first:  # not the batch at the position after all
        return Undecodable(tp, position, _describe(exc))
    return Undecodable(tp, first, _describe(exc), min(end - first, _MAX_RUN), batch)


@functools.cache  # once per process
def _warn_unseen_batch() -> None:
    log.warning(
        "aiokafka did not show the batch it failed on (has it changed?): records it cannot"
        " read are stepped over one a fetch round, slowly for a large batch"
    )


def _failed_batch(exc: BaseException) -> tuple[int, int] | None:
    """The first offset of the batch aiokafka was reading when it raised `exc`, and the
    offset after it: its fetch result's reader holds the batch as `next_batch` (aiokafka
    0.14's `PartitionRecords._unpack_records`); None when no frame of it does."""
    trace = exc.__traceback__
    while trace is not None:
        frame = trace.tb_frame
        if frame.f_code.co_name == "_unpack_records":
            batch = frame.f_locals.get("next_batch")
            first = getattr(batch, "base_offset", None)
            end = getattr(batch, "next_offset", None)
            if isinstance(first, int) and isinstance(end, int):
                return first, end
        trace = trace.tb_next
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"a header key is not UTF-8: byte {exc.object[exc.start : exc.start + 1]!r}"
    if isinstance(exc, InflatedTooLarge):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
