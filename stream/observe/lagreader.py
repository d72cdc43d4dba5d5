"""Reading consumer lag from Kafka: per group and partition, what is committed, what is
waiting, and how old the oldest waiting record is.

For each group: the committed offset (from the group coordinator), the log start and end
offsets (the end is the high watermark, as Kafka's own consumer-groups tool reports it), and
the oldest record the group has not processed: the first record at or after its position,
read with a group-less `read_committed` consumer (assign, seek, fetch with a deadline), with
the timestamp of the record before it, read in the same fetch. What those timestamps are
worth is `stream.observe.lagage`'s to judge: producers set them.

What "lag" means here, where it differs from `end - committed`:
- Transaction markers are not lag. Exactly-once leaves a commit marker after the last record
  of each transaction, so an idle partition ends one offset past its committed offset. The
  reader sees the fetch skip the marker and the position reach the end: nothing waits, lag 0.
  Lag counts from the oldest waiting record to the end, so a marker after records that do
  wait still counts one (Kafka cannot count records without reading each of them).
- A partition the group never committed is listed with its real backlog, from the log start
  (the engine reads a new partition from the earliest offset): a new group, or a partition
  added by `topics apply --add-partitions`. Which partitions: every partition of every topic
  the group is known to read — from its committed offsets, its members' subscriptions and
  assignments, and the topics the caller names (the pipeline's groups read known topics).
- An empty partition has lag 0, committed or not.

Unknown stays unknown: an unreadable end, or a record that could not be fetched in time,
gives None here and NaN in metrics, never 0. Members come from DescribeGroups (classic
protocol, which aiokafka uses); groups on Kafka's newer consumer protocol answer without
members, and `members` is then None.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from functools import partial
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import anyio
from aiokafka import TopicPartition
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import for_code

from stream.config import KafkaSettings
from stream.engine.fetch import UNDECODABLE
from stream.errors import KafkaError
from stream.kafka import (
    admin_client,
    consumer_client,
    group_offsets,
    retrying,
    transient,
    translated,
)

__all__ = ["PIPELINE_GROUPS", "GroupReading", "LagReader", "PartitionReading", "read_patiently"]

T = TypeVar("T")

# The pipeline's consumer groups and the topics each reads (names before STREAM_TOPIC_PREFIX):
# a group that has not committed yet still has these partitions to show.
PIPELINE_GROUPS: Mapping[str, tuple[str, ...]] = {
    "predictions-primary": ("predictions.requests", "predictions.backfill"),
    "predictions-fallback": ("predictions.fallback",),
}

_TRIES = 7  # about 4 s of back-off in all
_AGAIN_S = 0.5  # between readings while riding out a transient failure
_POLL_S = 0.05  # a fetch that returns nothing is re-checked this often against the log end


async def read_patiently(
    reader: LagReader, groups: Mapping[str, Sequence[str]], *, patience_s: float, round_s: float
) -> list[GroupReading]:
    """One reading, each attempt within `round_s` (else `TimeoutError`). A failure Kafka
    calls transient is read again until `patience_s` have passed: when a broker dies, its
    groups' coordinator moves only once the controllers fence it (about 9 s, the brokers'
    broker.session.timeout.ms), longer than the reader's own retries of each request."""
    give_up = time.monotonic() + patience_s
    while True:
        try:
            with anyio.fail_after(round_s):
                return await reader.read(groups)
        except KafkaError as exc:
            if not transient(exc) or time.monotonic() + _AGAIN_S > give_up:
                raise
        await anyio.sleep(_AGAIN_S)


class PartitionReading(NamedTuple):
    """What Kafka says about one partition of one group, at one moment."""

    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    metadata: str | None
    start: int | None  # log start offset
    end: int | None  # log end offset (high watermark)
    # the oldest record the group has not processed; `end` when none waits (markers only)
    first_waiting: int | None
    oldest_timestamp_ms: int | None  # of that record
    owner: str | None  # member id of the live member assigned this partition
    # of the record before it (the last one the group processed), when one was read
    before_timestamp_ms: int | None = None

    @property
    def position(self) -> int | None:
        """Where the group reads next: its committed offset, or the log start where it never
        committed or where retention deleted what its offset points at."""
        if self.committed is None or self.start is None:
            return self.start if self.committed is None else self.committed
        return max(self.committed, self.start)

    @property
    def lag(self) -> int | None:
        """Offsets from the oldest waiting record to the end (markers alone are not lag)."""
        position = self.position
        if self.end is None or position is None:
            return None
        first = position if self.first_waiting is None else max(self.first_waiting, position)
        return max(0, self.end - first)


class GroupReading(NamedTuple):
    group: str
    exists: bool  # it has members, committed offsets, or partitions to read
    state: str | None
    members: int | None
    partitions: tuple[PartitionReading, ...]
    at: float  # wall-clock seconds when it was read


class _Waiting(NamedTuple):
    offset: int  # of the first record at or after the position, or the end when none is
    timestamp_ms: int | None
    before_ms: int | None = None  # of the record before it, when the fetch returned one


class LagReader:
    """Reads lag from Kafka: an admin client and a `read_committed` consumer without a group."""

    def __init__(self, settings: KafkaSettings, *, fetch_timeout_s: float = 5.0) -> None:
        self._settings = settings
        self._fetch_timeout_s = fetch_timeout_s
        self._stack = AsyncExitStack()
        self._admin: Any = None
        self._consumer: Any = None
        # (topic, partition, position) → the first record there: fetched once, not per round
        self._waiting: dict[tuple[str, int, int], _Waiting] = {}
        self.cluster_id: str | None = None

    async def __aenter__(self) -> LagReader:
        doing = "reading consumer lag"
        try:  # whatever this opened is closed if it cannot finish (also when cancelled)
            self._admin = await self._stack.enter_async_context(
                admin_client(self._settings, doing=doing)
            )
            self._consumer = await self._stack.enter_async_context(
                consumer_client(  # it reads a record per partition: a bomb cannot take it down
                    self._settings,
                    doing=doing,
                    group_id=None,
                    # skips transaction markers and aborted records: what is left is real work
                    isolation_level="read_committed",
                    auto_offset_reset="earliest",
                    # one record per partition is all we need; Kafka still sends a whole batch
                    max_partition_fetch_bytes=64 * 1024,
                )
            )
            try:
                self.cluster_id = (await self._admin.describe_cluster()).get("cluster_id")
            except (AIOKafkaError, OSError) as exc:
                raise await translated(exc, self._settings, doing) from exc
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def read(self, groups: Mapping[str, Sequence[str]]) -> list[GroupReading]:
        """One reading of each group (→ the topics it is known to read, may be none);
        Kafka failures become our `KafkaError`."""
        try:
            return await self._read(groups)
        except (AIOKafkaError, OSError) as exc:
            raise await translated(exc, self._settings, "reading consumer lag") from exc

    async def _read(self, groups: Mapping[str, Sequence[str]]) -> list[GroupReading]:
        at = time.time()
        described = await retrying(partial(self._describe, groups), tries=_TRIES)
        committed = {g: await group_offsets(self._admin, g, tries=_TRIES) for g in groups}
        owners = {g: _owners(described.get(g)) for g in groups}
        topics = {
            g: {tp.topic for tp in (*committed[g], *owners[g])}
            | _subscribed(described.get(g))
            | set(groups[g])
            for g in groups
        }
        existing = await self._partitions(set().union(*topics.values()))
        wanted = {
            g: sorted(
                {TopicPartition(t, p) for t in topics[g] for p in existing.get(t, ())}
                | set(committed[g])
                | set(owners[g])
            )
            for g in groups
        }
        known = sorted({tp for tps in wanted.values() for tp in tps if tp.topic in existing})
        ends = await self._offsets(self._consumer.end_offsets, known)
        starts = await self._offsets(self._consumer.beginning_offsets, known)
        readings = []
        for group in groups:
            partitions = [
                _reading(tp, committed[group].get(tp), starts.get(tp), ends.get(tp), owners[group])
                for tp in wanted[group]
            ]
            waiting = await self._first_waiting(partitions)
            partitions = [
                p._replace(
                    first_waiting=w.offset,
                    oldest_timestamp_ms=w.timestamp_ms,
                    before_timestamp_ms=w.before_ms,
                )
                if (w := waiting.get(TopicPartition(p.topic, p.partition)))
                else p
                for p in partitions
            ]
            readings.append(_group(group, described.get(group), partitions, at))
        return readings

    async def _offsets(
        self,
        ask: Callable[[list[TopicPartition]], Awaitable[dict[TopicPartition, int]]],
        tps: list[TopicPartition],
    ) -> dict[TopicPartition, int]:
        """Offsets from each partition's leader. A leader that cannot tell (one elected
        while the partition has fewer in-sync replicas than min.insync.replicas does not
        know its high watermark) leaves its partitions unknown, not the round lost."""
        if not tps:
            return {}
        with anyio.move_on_after(self._fetch_timeout_s):
            return await ask(tps)
        found: dict[TopicPartition, int] = {}

        async def one(tp: TopicPartition) -> None:
            with anyio.move_on_after(self._fetch_timeout_s), suppress(AIOKafkaError):
                found.update(await ask([tp]))

        async with anyio.create_task_group() as group:
            for tp in tps:
                group.start_soon(one, tp)
        return found

    async def _describe(self, groups: Iterable[str]) -> dict[str, dict[str, Any]]:
        # One group per request: aiokafka 0.14 mis-decodes a DescribeGroups answer for
        # several groups from Kafka 4.4 (the second group's fields come out shifted).
        described: dict[str, dict[str, Any]] = {}
        for name in groups:
            for response in await self._admin.describe_consumer_groups([name]):
                for group in response.to_object()["groups"]:
                    error = for_code(group["error_code"]) if group["error_code"] else None
                    if error is not None and error.retriable:
                        # a coordinator moving or loading its groups: not "no such group"
                        raise error(f"describing group {name}")
                    if error is None and group["group"] == name:
                        described[name] = group
        return described

    async def _partitions(self, topics: set[str]) -> dict[str, list[int]]:
        """Partition numbers of those of `topics` that exist. Asks for every topic: naming
        one that is missing would create it on a cluster that auto-creates topics."""
        if not topics:
            return {}
        return {
            t["topic"]: sorted(p["partition"] for p in t["partitions"])
            for t in await self._admin.describe_topics()
            if t["topic"] in topics and t["error_code"] == 0
        }

    async def _first_waiting(
        self, partitions: Sequence[PartitionReading]
    ) -> dict[TopicPartition, _Waiting]:
        """The first waiting record of each partition with offsets left to read."""
        positions = {
            TopicPartition(p.topic, p.partition): (position, p.end, p.start)
            for p in partitions
            if (position := p.position) is not None and p.end is not None and p.end > position
        }
        keys = {(tp.topic, tp.partition, position) for tp, (position, *_) in positions.items()}
        self._waiting = {k: v for k, v in self._waiting.items() if k in keys}
        found = {
            tp: self._waiting[(tp.topic, tp.partition, position)]
            for tp, (position, *_) in positions.items()
            if (tp.topic, tp.partition, position) in self._waiting
        }
        missing = {tp: pair for tp, pair in positions.items() if tp not in found}
        if missing:
            fetched = await self._fetch_first(missing)
            for tp, waiting in fetched.items():
                position, end, _ = missing[tp]
                if waiting.offset < end:  # a record, not markers: it stays where it is
                    self._waiting[(tp.topic, tp.partition, position)] = waiting
            found.update(fetched)
        return found

    async def _fetch_first(
        self, positions: Mapping[TopicPartition, tuple[int, int, int | None]]
    ) -> dict[TopicPartition, _Waiting]:
        """For each partition (→ position, end, log start): the first record at or after the
        position, or the end when the fetch skips only markers (or aborted records) up to it;
        left out when neither is known within the deadline. The fetch starts one record
        earlier where there is one, for the predecessor's timestamp (a marker there is
        skipped, and the predecessor stays unknown).

        Two groups at different positions of one partition would need two seeks; one wins
        this round and the other is fetched next round.
        """
        consumer = self._consumer
        tps = set(positions)
        # Assign only to grow: a change of assignment cancels the fetcher's requests, and a
        # consumer stopped in that moment waits for up to a minute in aiokafka 0.14.
        if not tps <= consumer.assignment():
            consumer.assign(sorted(consumer.assignment() | tps))
        consumer.pause(*(consumer.assignment() - tps))
        consumer.resume(*tps)
        for tp, (position, _, start) in positions.items():
            consumer.seek(tp, position - 1 if start is not None and position > start else position)
        found: dict[TopicPartition, _Waiting] = {}
        before: dict[TopicPartition, int | None] = {}
        deadline = time.monotonic() + self._fetch_timeout_s
        try:
            while (pending := tps - set(found)) and (left := deadline - time.monotonic()) > 0:
                timeout_ms = max(1, int(min(left, _POLL_S) * 1000))
                try:
                    batches = await consumer.getmany(*pending, timeout_ms=timeout_ms)
                except UNDECODABLE:
                    # A record the client cannot decode (stream.engine.fetch): what waits
                    # there is unknown this round; the engine dead-letters it and moves on.
                    break
                for tp, records in batches.items():
                    if tp in pending:
                        _first_after(tp, positions[tp][0], records, found, before)
                for tp in pending - set(found):
                    end = positions[tp][1]
                    if await consumer.position(tp) >= end:
                        found[tp] = _Waiting(end, None)  # only markers were left
                consumer.pause(*found)  # stop fetching what we no longer need
        finally:
            consumer.pause(*tps)
        return found


def _first_after(
    tp: TopicPartition,
    position: int,
    records: Sequence[Any],
    found: dict[TopicPartition, _Waiting],
    before: dict[TopicPartition, int | None],
) -> None:
    """Note the predecessor's timestamp, and the first record at or after `position`."""
    for record in records:
        stamp = record.timestamp if record.timestamp >= 0 else None  # -1: no timestamp
        if record.offset < position:
            before[tp] = stamp
        else:
            found[tp] = _Waiting(record.offset, stamp, before.get(tp))
            return


def _reading(
    tp: TopicPartition, meta: Any, start: int | None, end: int | None, owners: dict[Any, str]
) -> PartitionReading:
    committed = int(meta.offset) if meta is not None and meta.offset >= 0 else None
    return PartitionReading(
        topic=tp.topic,
        partition=tp.partition,
        committed=committed,
        metadata=str(meta.metadata) if meta is not None else None,
        start=start,
        end=end,
        first_waiting=None,
        oldest_timestamp_ms=None,
        owner=owners.get(tp),
    )


def _group(
    name: str, description: dict[str, Any] | None, partitions: list[PartitionReading], at: float
) -> GroupReading:
    state = description["state"] if description else None
    members = len(description["members"]) if description else None
    exists = bool(partitions) or state not in (None, "Dead")
    return GroupReading(name, exists, state, members, tuple(partitions), at)


def _consumer_members(description: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The members of a classic-protocol consumer group (others carry no assignment)."""
    if not description or description.get("protocol_type") != "consumer":
        return []
    members: list[dict[str, Any]] = description["members"]
    return members


def _owners(description: dict[str, Any] | None) -> dict[TopicPartition, str]:
    """Which live member is assigned each partition."""
    owners = {}
    for member in _consumer_members(description):
        if not member["member_assignment"]:
            continue
        assignment = ConsumerProtocolMemberAssignment.decode(member["member_assignment"])
        for tp in assignment.partitions():
            owners[TopicPartition(tp.topic, tp.partition)] = member["member_id"]
    return owners


def _subscribed(description: dict[str, Any] | None) -> set[str]:
    """The topics the live members subscribe to (partitions not assigned yet included)."""
    topics: set[str] = set()
    for member in _consumer_members(description):
        if member["member_metadata"]:
            metadata = ConsumerProtocolMemberMetadata.decode(member["member_metadata"])
            topics.update(metadata.subscription)
    return topics
