"""After a crash under at-least-once: what the dead owner finished but never committed.

A worker commits its finished offsets every `STREAM_COMMIT_INTERVAL_S`. Killed between two
commits (SIGKILL, out of memory, a node lost), it leaves records whose outputs Kafka holds
but whose offsets say "not finished": their next owner would call the provider for them
again and write their outputs twice. So:

- every output carries a `stream-input` header naming the record it came from, and which
  of that record's outputs it is: `<topic>:<partition>:<offset>:<index>/<count>`;
- every commit carries a `since` note: a time (epoch ms, the writer's clock) before which
  no output of a record it leaves unfinished was sent: the oldest write still awaiting
  Kafka's ack, else the commit's own time;
- the next owner of a partition whose last commit has that note reads the output topics
  from then (less a margin for clocks) to their end: at the input's partition number where
  the partition counts match (co-partitioned outputs), every partition otherwise. A record
  all of whose outputs it finds is finished: not run again, not written again;
- outputs placed by their key's hash (an unkeyed request's result, keyed by its
  `request_id`) are in any partition: once a partition wrote one, its commits say so (a
  `spread` note) for as long as its owner holds it, and its next owners inherit the note;
  a next owner then reads every partition of each output topic.

The scan is bounded (`RECOVERY_S`) and best effort: what it does not find runs again, as it
would without it. Exactly-once needs none of it: outputs and offsets commit together.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError as AIOKafkaError

from stream.config import KafkaSettings
from stream.engine.offsets import split_notes
from stream.engine.partitions import Partition
from stream.errors import KafkaError
from stream.kafka import start_client

__all__ = [
    "HEADER",
    "RECOVERY_S",
    "SINCE_REFRESH_S",
    "Unfinished",
    "commit_positions",
    "input_headers",
    "recover",
    "since_ms",
]

log = logging.getLogger(__name__)

HEADER = "stream-input"
RECOVERY_S = 5.0  # the scan's share of an assignment callback
# How old an idle partition's `since` note may grow: a next owner reads the output
# partitions from it, whatever other partitions wrote there meanwhile.
SINCE_REFRESH_S = 60.0
# Outputs are stamped by the writer's clock (CreateTime), the `since` note too; a topic that
# stamps appends (LogAppendTime) uses the broker's, which may differ by this much.
_CLOCK_MARGIN_MS = 5_000


class Unfinished(NamedTuple):
    """What the previous owner of an input partition left: offsets from `watermark` on may
    have outputs in Kafka, sent no earlier than `since` (epoch ms)."""

    watermark: int
    since: int
    spread: bool = False  # outputs placed by their keys' hash: look in every partition


def input_headers(tp: TopicPartition, offset: int, count: int) -> list[tuple[str, bytes]]:
    """The `stream-input` header of each of a record's `count` outputs, in order."""
    stem = f"{tp.topic}:{tp.partition}:{offset}:"
    return [(HEADER, f"{stem}{index}/{count}".encode()) for index in range(count)]


def _parse(value: bytes) -> tuple[TopicPartition, int, int, int] | None:
    """(input partition, offset, index, count) from a header value; None when not ours."""
    try:
        topic, partition, offset, share = value.decode("ascii").rsplit(":", 3)
        index, count = share.split("/")
        parsed = TopicPartition(topic, int(partition)), int(offset), int(index), int(count)
    except (UnicodeDecodeError, ValueError):
        return None
    return parsed if 0 <= parsed[2] < parsed[3] else None


def since_ms(writes: Iterable[float], now: float, now_monotonic: float) -> int:
    """The `since` note of a commit made at `now` (epoch s): the oldest write in progress
    (`writes`: when each began, monotonic), else now."""
    oldest = min(writes, default=now_monotonic)
    return int((now - max(0.0, now_monotonic - oldest)) * 1000)


def commit_positions(
    partitions: Iterable[Partition], now: float, now_monotonic: float
) -> dict[Partition, tuple[tuple[int, str], tuple[int, str]]]:
    """At-least-once: the partitions due a commit, each with its position without and with
    its `since` note (what is compared, and what is committed).

    A partition leaving with no write in progress (revoked, or drained by a graceful
    stop) gets no note: its running records hold their outputs, so its next owner need
    not look. Due: the position moved; or the note in
    Kafka is not what the partition needs (there, or not); or an idle partition's note is
    older than `SINCE_REFRESH_S` (its next owner would read all that other partitions
    wrote to the same output partitions since)."""
    due = {}
    for partition in partitions:
        if partition.offsets.watermark < 0:
            continue  # nothing fetched yet on a partition without a committed offset
        base = partition.position()
        clean = (partition.revoked or partition.drained) and not partition.writes
        spread = False
        if clean:
            full = base
        else:
            writes = partition.writes.values()
            notes = {"since": str(since_ms(writes, now, now_monotonic))}
            # Kept while this owner holds it: the note must also cover outputs written
            # until the next commit (the first after a commit without it is not covered).
            if spread := partition.spread:
                notes["spread"] = "1"
            full = partition.position(notes)
        noted = partition.committed != partition.committed_base  # Kafka has a `since` note
        if (
            base != partition.committed_base
            or clean == noted
            or (noted and now_monotonic - partition.committed_at >= SINCE_REFRESH_S)
            or (not clean and spread != _noted_spread(partition))
        ):
            due[partition] = (base, full)
    return due


def _noted_spread(partition: Partition) -> bool:
    committed = partition.committed
    return committed is not None and split_notes(committed[1])[1].get("spread") == "1"


class _Found:
    """Outputs seen per input record: which shares of how many."""

    def __init__(self, wanted: Mapping[TopicPartition, Unfinished]) -> None:
        self._wanted = wanted
        self._shares: dict[tuple[TopicPartition, int], set[tuple[int, int]]] = defaultdict(set)

    def note(self, headers: Sequence[tuple[str, bytes]]) -> None:
        for key, value in headers:
            if key != HEADER or value is None:
                continue
            parsed = _parse(value)
            if parsed is None:
                continue
            tp, offset, index, count = parsed
            unfinished = self._wanted.get(tp)
            if unfinished is not None and offset >= unfinished.watermark:
                self._shares[(tp, offset)].add((index, count))

    def finished(self) -> dict[TopicPartition, set[int]]:
        """Records with every output seen (for some count of outputs: a re-run may have
        made another number of them)."""
        done: dict[TopicPartition, set[int]] = defaultdict(set)
        for (tp, offset), shares in self._shares.items():
            counts = {count for _, count in shares}
            if any(len({i for i, c in shares if c == count}) == count for count in counts):
                done[tp].add(offset)
        return dict(done)


async def recover(
    settings: KafkaSettings,
    wanted: Mapping[TopicPartition, Unfinished],
    outputs: Sequence[str],
    budget_s: float = RECOVERY_S,
) -> dict[TopicPartition, set[int]]:
    """The offsets of `wanted` input partitions whose outputs are all in Kafka already."""
    if not wanted or not outputs:
        return {}
    found = _Found(wanted)
    consumer = AIOKafkaConsumer(
        **settings.client_options(), enable_auto_commit=False, isolation_level="read_committed"
    )
    started = time.monotonic()
    try:
        with anyio.move_on_after(budget_s) as budget:
            await start_client(consumer, settings, "reading outputs to recover finished work")
            await _scan(consumer, wanted, outputs, found)
        if budget.cancelled_caught:
            log.warning(
                "reading the outputs of a dead owner took over %.0f s: what was not found "
                "runs again",
                budget_s,
            )
    except (AIOKafkaError, KafkaError, OSError) as exc:
        log.warning("could not read the outputs of a dead owner (%s): its work runs again", exc)
    except Exception as exc:  # an output the client cannot decode, a bug: never stop here
        log.warning(
            "reading the outputs of a dead owner failed (%s): its work runs again",
            type(exc).__name__,
            exc_info=exc,
        )
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
            await consumer.stop()
    done = found.finished()
    log.debug("recovery scan took %.3f s", time.monotonic() - started)
    return done


async def _scan(
    consumer: AIOKafkaConsumer,
    wanted: Mapping[TopicPartition, Unfinished],
    outputs: Sequence[str],
    found: _Found,
) -> None:
    # Every topic's partitions, as a cluster view of its own (aiokafka's `topics()` reads
    # it without keeping it).
    cluster = await consumer._client.fetch_all_metadata()
    starts: dict[TopicPartition, int] = {}  # output partition → the earliest `since` for it
    for tp, unfinished in wanted.items():
        for tp_out in _outputs_of(cluster, tp, outputs, unfinished.spread):
            starts[tp_out] = min(starts.get(tp_out, unfinished.since), unfinished.since)
    if not starts:
        return
    todo = await _positioned(consumer, starts)
    while todo:
        batch = await consumer.getmany(*todo, timeout_ms=200)
        for records in batch.values():
            for record in records:
                found.note(record.headers)
        for tp in list(todo):
            if await consumer.position(tp) >= todo[tp]:
                consumer.pause(tp)
                del todo[tp]


async def _positioned(
    consumer: AIOKafkaConsumer, starts: Mapping[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """Assign the output partitions, each at its first record sent since its `since` (less
    the margin); returns those with records to read, with the end to read them to."""
    consumer.assign(list(starts))
    first = await consumer.offsets_for_times(
        {tp: max(0, since - _CLOCK_MARGIN_MS) for tp, since in starts.items()}
    )
    ends = await consumer.end_offsets(list(starts))
    todo = {}
    for tp in starts:
        at = first.get(tp)
        if at is not None and at.offset < ends[tp]:
            consumer.seek(tp, at.offset)
            todo[tp] = ends[tp]
        else:
            consumer.pause(tp)  # nothing sent there since
    return todo


def _outputs_of(
    cluster: Any, tp: TopicPartition, outputs: Sequence[str], spread: bool
) -> list[TopicPartition]:
    """Where the outputs of input partition `tp` can be: its own partition number in an
    output topic with as many partitions (co-partitioning) unless some were `spread` by
    their keys, any partition otherwise."""
    theirs = cluster.partitions_for_topic(tp.topic) or set()
    found = []
    for topic in outputs:
        ours = cluster.partitions_for_topic(topic) or set()
        if not spread and len(ours) == len(theirs) and tp.partition in ours:
            found.append(TopicPartition(topic, tp.partition))
        else:
            found.extend(TopicPartition(topic, p) for p in sorted(ours))
    return found
