"""Consumer lag per group and partition, in records and in seconds, with a window status.

For each group: the committed offset (from the group coordinator), the log end offset
(the high watermark, as Kafka's own consumer-groups tool reports it), the lag in records,
and the lag in seconds: now minus the timestamp of the oldest unprocessed record, which is
the record at the committed offset, read with a group-less consumer (assign, seek, fetch
with a deadline). Nothing is interpolated, unlike kafka-lag-exporter: the age is that of a
real record. The engine commits its contiguous watermark (finished offsets above it travel in
the commit metadata), so counting from the committed offset is exactly "not yet safe".

Unknown stays unknown: no committed offset, an unreadable end, or a record that could not be
fetched in time gives None here and NaN in metrics, never 0. Members come from
DescribeGroups (classic protocol, which aiokafka uses); groups on Kafka's newer consumer
protocol answer without members, and `members` is then None.

`LagReader` does the Kafka I/O, `LagTracker` turns readings into rows with a status over a
sliding window (`stream.observe.lagstatus`), `LagMonitor` runs both in the background so a metrics
scrape only copies a cached tuple. `stream lag` itself is `stream.observe.lagcli`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack, suppress
from types import TracebackType
from typing import Any, NamedTuple

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError as AIOKafkaError
from anyio.abc import TaskStatus

from stream.config import KafkaSettings
from stream.errors import KafkaError
from stream.kafka import admin_client, translate
from stream.observe.lagstatus import DEFAULT_STALL_AFTER_S, Sample, Status, Windows, evaluate

__all__ = [
    "DEFAULT_GROUPS",
    "GroupReading",
    "LagMonitor",
    "LagReader",
    "LagRow",
    "LagTracker",
    "PartitionReading",
    "Status",
    "nan_if_none",
]

log = logging.getLogger(__name__)

DEFAULT_GROUPS = ("predictions-primary", "predictions-fallback")


class PartitionReading(NamedTuple):
    """What Kafka says about one partition of one group, at one moment."""

    topic: str
    partition: int
    committed: int | None
    metadata: str | None
    end: int | None
    oldest_timestamp_ms: int | None  # of the record at the committed offset
    owner: str | None  # member id of the live member assigned this partition


class GroupReading(NamedTuple):
    group: str
    exists: bool
    state: str | None
    members: int | None
    partitions: tuple[PartitionReading, ...]
    at: float  # wall-clock seconds when it was read


class LagRow(NamedTuple):
    """One line of `stream lag`: the contract scripts rely on (`--json`)."""

    group: str
    topic: str
    partition: int
    committed: int | None
    end: int | None
    lag: int | None
    lag_seconds: float | None
    status: Status
    members: int | None
    owner: str | None

    def as_json(self) -> dict[str, object]:
        return {**self._asdict(), "status": self.status.value}


class LagReader:
    """Reads lag from Kafka: an admin client and a consumer without a group."""

    def __init__(self, settings: KafkaSettings, *, fetch_timeout_s: float = 5.0) -> None:
        self._settings = settings
        self._fetch_timeout_s = fetch_timeout_s
        self._stack = AsyncExitStack()
        self._admin: Any = None
        self._consumer: Any = None
        # (topic, partition, offset) → timestamp: a stuck offset is fetched once, not per round
        self._timestamps: dict[tuple[str, int, int], int] = {}

    async def __aenter__(self) -> LagReader:
        self._admin = await self._stack.enter_async_context(
            admin_client(self._settings, doing="reading consumer lag")
        )
        consumer = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            # below the log start (retention deleted it): the oldest record that still exists
            auto_offset_reset="earliest",
            # one record per partition is all we need; Kafka still sends a whole first batch
            max_partition_fetch_bytes=64 * 1024,
            **self._settings.client_options(),
        )
        try:
            await consumer.start()
        except (AIOKafkaError, OSError) as exc:
            await consumer.stop()
            await self._stack.aclose()
            raise translate(exc, self._settings, "reading consumer lag") from exc
        self._consumer = consumer
        self._stack.push_async_callback(consumer.stop)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def read(self, groups: Sequence[str]) -> list[GroupReading]:
        """One reading of every group; Kafka failures become our `KafkaError`."""
        try:
            return await self._read(groups)
        except (AIOKafkaError, OSError) as exc:
            raise translate(exc, self._settings, "reading consumer lag") from exc

    async def _read(self, groups: Sequence[str]) -> list[GroupReading]:
        at = time.time()
        described = await self._describe(groups)
        committed = {
            group: await self._admin.list_consumer_group_offsets(group) for group in groups
        }
        owners = {group: _owners(described.get(group)) for group in groups}
        wanted = {tp for group in groups for tp in (*committed[group], *owners[group])}
        ends = await self._end_offsets(sorted(wanted))
        oldest = await self._oldest_timestamps(committed, ends)
        readings = []
        for group in groups:
            description = described.get(group)
            state = description["state"] if description else None
            members = len(description["members"]) if description else None
            partitions = tuple(
                PartitionReading(
                    topic=tp.topic,
                    partition=tp.partition,
                    committed=_offset(committed[group].get(tp)),
                    metadata=_metadata(committed[group].get(tp)),
                    end=ends.get(tp),
                    oldest_timestamp_ms=oldest.get((tp, _offset(committed[group].get(tp)))),
                    owner=owners[group].get(tp),
                )
                for tp in sorted({*committed[group], *owners[group]})
            )
            exists = bool(partitions) or (state not in (None, "Dead"))
            readings.append(GroupReading(group, exists, state, members, partitions, at))
        return readings

    async def _end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Log end offsets from each partition's leader. A leader that cannot tell (one
        elected while the partition has fewer in-sync replicas than min.insync.replicas
        does not know its high watermark) leaves its partitions unknown, not the round lost."""
        if not tps:
            return {}
        with anyio.move_on_after(self._fetch_timeout_s):
            ends: dict[TopicPartition, int] = await self._consumer.end_offsets(tps)
            return ends
        found: dict[TopicPartition, int] = {}

        async def one(tp: TopicPartition) -> None:
            with anyio.move_on_after(self._fetch_timeout_s), suppress(AIOKafkaError):
                found.update(await self._consumer.end_offsets([tp]))

        async with anyio.create_task_group() as group:
            for tp in tps:
                group.start_soon(one, tp)
        return found

    async def _describe(self, groups: Sequence[str]) -> dict[str, dict[str, Any]]:
        # One group per request: aiokafka 0.14 mis-decodes a DescribeGroups answer for
        # several groups from Kafka 4.4 (the second group's fields come out shifted).
        described: dict[str, dict[str, Any]] = {}
        for name in groups:
            for response in await self._admin.describe_consumer_groups([name]):
                for group in response.to_object()["groups"]:
                    if group["error_code"] == 0 and group["group"] == name:
                        described[name] = group
        return described

    async def _oldest_timestamps(
        self, committed: dict[str, dict[TopicPartition, Any]], ends: dict[TopicPartition, int]
    ) -> dict[tuple[TopicPartition, int | None], int]:
        """Timestamps of the records at the committed offsets of partitions with lag."""
        positions = {
            (tp, meta.offset)
            for offsets in committed.values()
            for tp, meta in offsets.items()
            if meta.offset >= 0 and ends.get(tp, 0) > meta.offset
        }
        cached = {(tp.topic, tp.partition, offset) for tp, offset in positions}
        self._timestamps = {k: v for k, v in self._timestamps.items() if k in cached}
        missing = {
            tp: offset
            for tp, offset in positions
            if (tp.topic, tp.partition, offset) not in self._timestamps
        }
        if missing:
            for tp, timestamp in (await self._fetch_first(missing)).items():
                self._timestamps[(tp.topic, tp.partition, missing[tp])] = timestamp
        return {
            (tp, offset): self._timestamps[(tp.topic, tp.partition, offset)]
            for tp, offset in positions
            if (tp.topic, tp.partition, offset) in self._timestamps
        }

    async def _fetch_first(self, positions: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The timestamp of the first record at or after each position, within the deadline.

        Two groups at different offsets of one partition would need two seeks; the lowest
        wins this round and the other is fetched next round (the cache keeps the first).
        """
        consumer = self._consumer
        consumer.assign(list(positions))
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        found: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + self._fetch_timeout_s
        try:
            while len(found) < len(positions) and (left := deadline - time.monotonic()) > 0:
                batches = await consumer.getmany(timeout_ms=max(1, int(left * 1000)))
                for tp, records in batches.items():
                    if records and tp not in found and records[0].timestamp >= 0:
                        found[tp] = records[0].timestamp
                        consumer.pause(tp)  # stop fetching what we no longer need
        finally:
            consumer.assign([])
        return found


def _offset(meta: Any) -> int | None:
    return int(meta.offset) if meta is not None and meta.offset >= 0 else None


def _metadata(meta: Any) -> str | None:
    return str(meta.metadata) if meta is not None else None


def _owners(description: dict[str, Any] | None) -> dict[TopicPartition, str]:
    """Which live member is assigned each partition (classic consumer protocol only)."""
    if not description or description.get("protocol_type") != "consumer":
        return {}
    owners = {}
    for member in description["members"]:
        if not member["member_assignment"]:
            continue
        assignment = ConsumerProtocolMemberAssignment.decode(member["member_assignment"])
        for tp in assignment.partitions():
            owners[TopicPartition(tp.topic, tp.partition)] = member["member_id"]
    return owners


class LagTracker:
    """Turns readings into rows, keeping a sliding window of samples per partition."""

    def __init__(self, *, window: int = 10, stall_after_s: float = DEFAULT_STALL_AFTER_S) -> None:
        self._windows: Windows[tuple[str, str, int]] = Windows(window)
        self._stall_after_s = stall_after_s

    def update(self, readings: Sequence[GroupReading]) -> list[LagRow]:
        rows = [self._row(g, p) for g in readings for p in g.partitions]
        self._windows.retain({(r.group, r.topic, r.partition) for r in rows})
        return rows

    def _row(self, group: GroupReading, p: PartitionReading) -> LagRow:
        lag = p.end - p.committed if p.end is not None and p.committed is not None else None
        sample = Sample(
            at=group.at,
            committed=p.committed,
            end=p.end,
            metadata=p.metadata,
            owned=None if group.members is None else p.owner is not None,
            lag_seconds=_lag_seconds(lag, p.oldest_timestamp_ms, group.at),
        )
        window = self._windows.add((group.group, p.topic, p.partition), sample)
        status = evaluate(window, stall_after_s=self._stall_after_s)
        return LagRow(
            group=group.group,
            topic=p.topic,
            partition=p.partition,
            committed=p.committed,
            end=p.end,
            lag=lag,
            lag_seconds=sample.lag_seconds,
            status=status,
            members=group.members,
            owner=p.owner,
        )


def _lag_seconds(lag: int | None, oldest_ms: int | None, now: float) -> float | None:
    if lag is None:
        return None
    if lag <= 0:
        return 0.0  # nothing unprocessed: known to be zero
    if oldest_ms is None:
        return None
    # a producer clock ahead of ours would give a negative age; nothing waits less than 0 s
    return max(0.0, now - oldest_ms / 1000)


def nan_if_none(value: float | None) -> float:
    """Metrics show unknown as NaN, never as 0."""
    return math.nan if value is None else float(value)


class LagMonitor:
    """Reads lag on an interval in the background and caches the latest rows.

    `rows()` and `healthy` only look at the cache, so a metrics scrape or a readiness probe
    never waits on Kafka. A failed round keeps the previous rows (marked by `last_error`)
    and the monitor retries on the next interval; it never takes the worker down.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        groups: Sequence[str],
        *,
        interval_s: float = 15.0,
        window: int = 10,
        stall_after_s: float = DEFAULT_STALL_AFTER_S,
        fetch_timeout_s: float = 5.0,
    ) -> None:
        self.groups = tuple(groups)
        self.interval_s = interval_s
        self._settings = settings
        self._fetch_timeout_s = fetch_timeout_s
        self._tracker = LagTracker(window=window, stall_after_s=stall_after_s)
        self._rows: tuple[LagRow, ...] = ()
        self.rounds = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_success: float | None = None  # wall-clock seconds
        self._round_done = anyio.Event()

    def rows(self) -> tuple[LagRow, ...]:
        return self._rows

    @property
    def healthy(self) -> bool:
        """The last round reached Kafka (readiness: "Kafka is reachable")."""
        return self.last_success is not None and self.last_error is None

    async def next_round(self) -> None:
        """Wait until the next round (successful or not) has finished."""
        await self._round_done.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sample forever, every `interval_s`; cancel the task to stop it."""
        task_status.started()
        while True:
            try:
                async with LagReader(self._settings, fetch_timeout_s=self._fetch_timeout_s) as r:
                    while True:
                        await self._bounded_round(r)
                        await anyio.sleep(self.interval_s)
            except KafkaError as exc:
                self._failed(exc)
                await anyio.sleep(self.interval_s)

    async def _bounded_round(self, reader: LagReader) -> None:
        """A round that hangs (a broker that accepts but never answers) is a failed round."""
        limit = 2 * self._fetch_timeout_s + 10.0
        with anyio.move_on_after(limit) as scope:
            await self._round(reader)
        if scope.cancelled_caught:
            self._failed(KafkaError(f"reading lag took over {limit:.0f} s; will try again"))

    async def _round(self, reader: LagReader) -> None:
        readings = await reader.read(self.groups)
        self._rows = tuple(self._tracker.update(readings))
        self.rounds += 1
        self.last_success = time.time()
        self.last_error = None
        self._finish_round()

    def _failed(self, exc: KafkaError) -> None:
        self.errors += 1
        self.last_error = str(exc)
        # A new cluster or group has no coordinator for a moment: worth a warning only if
        # it lasts (the next round reports it again; /readyz shows it meanwhile).
        transient = "CoordinatorNotAvailable" in str(exc) and self.last_success is None
        log.log(logging.INFO if transient else logging.WARNING, "lag round failed: %s", exc)
        self._finish_round()

    def _finish_round(self) -> None:
        done, self._round_done = self._round_done, anyio.Event()
        done.set()

    def __repr__(self) -> str:
        return (
            f"<LagMonitor groups={list(self.groups)} rows={len(self._rows)} "
            f"rounds={self.rounds} errors={self.errors}>"
        )
