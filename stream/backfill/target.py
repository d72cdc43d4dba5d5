"""The topic a backfill run writes: the largest record it takes, and which source records
it already holds a copy of.

Both runs (replay, redrive) mark what they write with a header naming the source record
(`topic/partition/offset`). Reading those headers back is how a run learns what an earlier
one wrote, even one killed between Kafka's acknowledgement and its own bookkeeping.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError
from aiokafka.structs import TopicPartition

from stream import topics
from stream.backfill.window import Span, batches, spans
from stream.config import Settings
from stream.engine.fetch import Undecodable
from stream.engine.outputs import MAX_OUTPUT_BYTES

__all__ = [
    "MAX_REQUEST_SIZE",
    "batch_bytes",
    "contains",
    "copies",
    "limit",
    "merged",
    "origin",
    "oversize",
    "refusal",
]

# What backfill producers let through (aiokafka's default is 1 MiB, under a topic's
# 1,048,588): the target's max.message.bytes, checked before sending, is the real limit.
# aiokafka's own estimate of a record runs a few bytes over its size: room for that.
MAX_REQUEST_SIZE = MAX_OUTPUT_BYTES + 1024
# Kafka refused one record for its size: that record cannot be written, the rest can.
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
# A record batch's header (v2 format): offsets, lengths, CRC, producer id and epoch…
_BATCH_HEADER_BYTES = 61
# Kafka's default max.message.bytes, for a topic whose configuration we may not read.
_KAFKA_MAX_MESSAGE_BYTES = 1_048_588
# A copy is stamped by this machine's clock, its source by another's: allow for skew, and
# for Kafka's message.timestamp.after.max.ms (1 h by default since Kafka 3.6): a record
# stamped up to that far ahead is taken, and its copy written that much before its stamp
# (with 15 min, a second replay from a time after such copies wrote them all again).
CLOCK_SKEW_MS = 75 * 60_000


async def limit(admin: Any, settings: Settings, topic: str) -> int:
    """The largest record (as aiokafka sizes it) that `topic` takes: its max.message.bytes
    on the cluster, else as declared in topics/, and never more than the producer sends."""
    try:
        found = (await topics.max_message_bytes(admin, [topic])).get(topic)
    except AIOKafkaError:
        found = None
    if found is None:
        declared = {
            spec.name: spec.configs.get("max.message.bytes")
            for spec in topics.load_specs(settings.topics_dir, prefix=settings.topic_prefix)
        }
        found = int(declared.get(topic) or _KAFKA_MAX_MESSAGE_BYTES)
    return min(found, MAX_OUTPUT_BYTES)


def oversize(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]], most: int
) -> str | None:
    """Why a record cannot be written to a topic taking `most` bytes; None if it can."""
    size = batch_bytes(key, value, headers)
    if size <= most:
        return None
    return f"larger than the target takes ({size:,} bytes, max.message.bytes {most:,})"


def batch_bytes(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]
) -> int:
    """The size of an uncompressed batch holding this record alone: what the broker holds
    against max.message.bytes (Kafka's v2 record format)."""
    body = 3  # attributes, offset delta 0, timestamp delta 0: a byte each
    body += _field(key) + _field(value) + _varint(len(headers))
    body += sum(_field(name.encode()) + _field(data) for name, data in headers)
    return _BATCH_HEADER_BYTES + _varint(body) + body


def _field(data: bytes | None) -> int:
    """A length-prefixed field; a null is length -1, one byte."""
    return 1 if data is None else _varint(len(data)) + len(data)


def _varint(n: int) -> int:
    """Bytes in Kafka's zig-zag varint of a non-negative `n`."""
    return max(1, ((2 * n).bit_length() + 6) // 7)


async def refusal(sent: Any) -> str | None:
    """Wait for Kafka's answer to one send: why it refused that record for its size (sizes
    are checked before sending: only when the target changed meanwhile), else None. Any
    other error is the run's, raised."""
    try:
        await sent
    except _TOO_LARGE as exc:
        return f"Kafka refused it as too large ({type(exc).__name__})"
    return None


def origin(headers: Any, name: str) -> tuple[str, int, int] | None:
    """(topic, partition, offset) of header `name`, if it holds one; anything else (a null,
    a number that is not one) names no record."""
    for key, value in headers or ():
        if key != name or not isinstance(value, bytes):
            continue
        parts = value.decode(errors="replace").rsplit("/", 2)
        if len(parts) == 3 and all(p.isascii() and p.isdigit() for p in parts[1:]):
            return parts[0], int(parts[1]), int(parts[2])
    return None


async def copies(
    consumer: Any, targets: list[TopicPartition], header: str, source: str, since_ms: int
) -> dict[int, list[Span]]:
    """Source offsets (merged, sorted, per source partition) that the target's records
    written since `since_ms` name in `header`. A copy is younger than the run that wrote
    it, so records before that time (less the clock skew) need not be read."""
    bounds = await spans(consumer, targets, max(0, since_ms - CLOCK_SKEW_MS), None)
    found: dict[int, list[Span]] = {}
    # a record the client cannot decode holds no header we could read: not a copy
    async with aclosing(batches(consumer, bounds, on_undecodable=_ignore)) as stream:
        async for batch in stream:
            for record in batch:
                named = origin(record.headers, header)
                if named is not None and named[0] == source:
                    _extend(found.setdefault(named[1], []), named[2])
    return {partition: merged(ranges) for partition, ranges in found.items()}


def contains(ranges: list[Span], offset: int) -> bool:
    """Whether `offset` is in one of the merged, sorted `ranges`."""
    index = bisect.bisect_right([s.start for s in ranges], offset) - 1
    return index >= 0 and offset < ranges[index].end


def _ignore(bad: Undecodable) -> None:
    return None


def _extend(ranges: list[Span], offset: int) -> None:
    # one run copies consecutive offsets in order: a run of them collapses to one range
    if ranges and ranges[-1].end == offset:
        ranges[-1] = Span(ranges[-1].start, offset + 1)
    else:
        ranges.append(Span(offset, offset + 1))


def merged(ranges: list[Span]) -> list[Span]:
    """`ranges` sorted, with those that touch or overlap made one."""
    out: list[Span] = []
    for span in sorted(ranges):
        if out and span.start <= out[-1].end:
            out[-1] = Span(out[-1].start, max(out[-1].end, span.end))
        else:
            out.append(span)
    return out
