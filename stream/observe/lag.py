"""Consumer lag as rows with a status, and the worker's background monitor of it.

`stream.observe.lagreader` does the Kafka I/O; `LagTracker` turns its readings into rows
with a status over a sliding window (`stream.observe.lagstatus`), judging record timestamps
against the log ends it has seen (`stream.observe.lagage`); `LagMonitor` runs both in
the background so a metrics scrape or a readiness probe only copies a cached tuple.
`stream lag` itself is `stream.observe.lagcli`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import anyio
from anyio.abc import TaskStatus

from stream.config import KafkaSettings
from stream.engine.offsets import split_notes
from stream.errors import KafkaError
from stream.observe.lagage import EndHistory, age
from stream.observe.lagreader import GroupReading, LagReader, PartitionReading, read_patiently
from stream.observe.lagstatus import DEFAULT_STALL_AFTER_S, Sample, Status, Windows, evaluate

__all__ = ["LagMonitor", "LagRow", "LagTracker", "Status", "nan_if_none"]

log = logging.getLogger(__name__)

# how long a round rides out a failure Kafka calls transient (at most one interval): a dead
# broker's groups find another coordinator once the controllers fence it (about 9 s)
_PATIENCE_S = 15.0


class LagRow(NamedTuple):
    """One line of `stream lag`: the contract scripts rely on (`--json`)."""

    group: str
    topic: str
    partition: int
    committed: int | None  # None: never committed (lag then counts from the log start)
    end: int | None
    lag: int | None
    # the oldest waiting record's age: its timestamp where our own look agrees, else how
    # long we have seen it wait (None: unknown)
    lag_seconds: float | None
    status: Status
    members: int | None
    owner: str | None
    # Why the owner holds the partition back on purpose (`spend_limit`), from the note it
    # committed; None when it does not.
    held: str | None = None

    def as_json(self) -> dict[str, object]:
        return {**self._asdict(), "status": self.status.value}


class LagTracker:
    """Turns readings into rows, keeping a sliding window of samples per partition."""

    def __init__(self, *, window: int = 10, stall_after_s: float = DEFAULT_STALL_AFTER_S) -> None:
        self._windows: Windows[tuple[str, str, int]] = Windows(window)
        # outlives the window: how long a record has been seen waiting is our own clock's
        self._ends: EndHistory[tuple[str, str, int]] = EndHistory()
        self._stall_after_s = stall_after_s

    def update(self, readings: Sequence[GroupReading]) -> list[LagRow]:
        rows = [self._row(g, p) for g in readings for p in g.partitions]
        keys = {(r.group, r.topic, r.partition) for r in rows}
        self._windows.retain(keys)
        self._ends.retain(keys)
        return rows

    def _row(self, group: GroupReading, p: PartitionReading) -> LagRow:
        key = (group.group, p.topic, p.partition)
        self._ends.add(key, group.at, p.end)
        lag = p.lag
        low, high, shown = self._age(key, p, group.at)
        sample = Sample(
            at=group.at,
            position=p.position,
            lag=lag,
            metadata=p.metadata,
            owned=_owned(group, p),
            age_low=low,
            age_high=high,
        )
        window = self._windows.add(key, sample)
        return LagRow(
            group=group.group,
            topic=p.topic,
            partition=p.partition,
            committed=p.committed,
            end=p.end,
            lag=lag,
            lag_seconds=shown,
            status=evaluate(window, stall_after_s=self._stall_after_s),
            members=group.members,
            owner=p.owner,
            held=split_notes(p.metadata)[1].get("held") if p.owner is not None else None,
        )

    def _age(
        self, key: tuple[str, str, int], p: PartitionReading, now: float
    ) -> tuple[float, float, float | None]:
        """(at least, at most, shown) seconds the oldest waiting record has waited."""
        lag, position = p.lag, p.position
        if lag is None or position is None:
            return 0.0, math.inf, None
        if lag <= 0:
            return 0.0, 0.0, 0.0  # nothing unprocessed: known to be zero
        offset = position if p.first_waiting is None else max(p.first_waiting, position)
        seen_at, absent_at = self._ends.bounds(key, offset)
        if p.first_waiting is None:
            seen_at = None  # the record was not read: what waits there is not known
        return age(
            now,
            p.oldest_timestamp_ms,
            before_ms=p.before_timestamp_ms,
            seen_at=seen_at,
            absent_at=absent_at,
        )


# Group states in which DescribeGroups shows each member's assignment (mid-rebalance it
# shows none, which must not read as "nobody owns it").
_ASSIGNED_STATES = frozenset({"Stable", "Empty", "Dead"})


def _owned(group: GroupReading, p: PartitionReading) -> bool | None:
    """A live member owns the partition; None where Kafka does not tell."""
    if group.members is None or group.state not in _ASSIGNED_STATES:
        return None
    return p.owner is not None


def nan_if_none(value: float | None) -> float:
    """Metrics show unknown as NaN, never as 0."""
    return math.nan if value is None else float(value)


class LagMonitor:
    """Reads lag on an interval in the background and caches the latest rows.

    `rows()` and `healthy` only look at the cache, so a metrics scrape or a readiness probe
    never waits on Kafka. A failed round — Kafka's fault or a bug of ours, any `Exception` —
    keeps the previous rows (marked by `last_error`) and the monitor tries again on the next
    interval: monitoring never takes the worker's engines down.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        groups: Mapping[str, Sequence[str]] | Sequence[str],
        *,
        interval_s: float = 15.0,
        window: int = 10,
        stall_after_s: float = DEFAULT_STALL_AFTER_S,
        fetch_timeout_s: float = 5.0,
    ) -> None:
        # each group → the topics it is known to read (its partitions show before a commit)
        self.groups: dict[str, tuple[str, ...]] = (
            {g: tuple(t) for g, t in groups.items()}
            if isinstance(groups, Mapping)
            else {g: () for g in groups}
        )
        self.interval_s = interval_s
        self._settings = settings
        self._fetch_timeout_s = fetch_timeout_s
        self._tracker = LagTracker(window=window, stall_after_s=stall_after_s)
        self._rows: tuple[LagRow, ...] = ()
        self.rounds = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_success: float | None = None  # wall-clock seconds
        self.cluster_id: str | None = None  # as Kafka reports it, once a reader has started
        self._round_done = anyio.Event()

    def rows(self) -> tuple[LagRow, ...]:
        return self._rows

    @property
    def cluster_name(self) -> str:
        """The lag metrics' `cluster_name`: STREAM_KAFKA_CLUSTER_NAME, else the cluster id
        Kafka reports (empty until a reader has started)."""
        return self._settings.cluster_name or self.cluster_id or ""

    @property
    def healthy(self) -> bool:
        """The last round reached Kafka (readiness: "Kafka is reachable")."""
        return self.last_success is not None and self.last_error is None

    async def next_round(self) -> None:
        """Wait until the next round (successful or not) has finished."""
        await self._round_done.wait()

    def reader(self) -> LagReader:
        """A new reader for a run of rounds (a seam: tests hand in one that fails)."""
        return LagReader(self._settings, fetch_timeout_s=self._fetch_timeout_s)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sample forever, every `interval_s`; cancel the task to stop it."""
        task_status.started()
        while True:
            try:
                async with self.reader() as reader:
                    self.cluster_id = reader.cluster_id
                    while True:
                        await self._bounded_round(reader)
                        await anyio.sleep(self.interval_s)
            except Exception as exc:  # any failure: see the class docstring
                self._failed(exc)
                await anyio.sleep(self.interval_s)

    async def _bounded_round(self, reader: LagReader) -> None:
        """A round that hangs (a broker that accepts but never answers) is a failed round;
        one Kafka fails transiently (a dead broker's groups changing coordinator) is read
        again for a while first, so /readyz does not flap on a single broker's death."""
        limit = 2 * self._fetch_timeout_s + 10.0
        patience = min(self.interval_s, _PATIENCE_S)
        try:
            readings = await read_patiently(reader, self.groups, patience_s=patience, round_s=limit)
        except TimeoutError:
            self._failed(KafkaError(f"reading lag took over {limit:.0f} s; will try again"))
            return
        self._rows = tuple(self._tracker.update(readings))
        self.rounds += 1
        self.last_success = time.time()
        self.last_error = None
        self._finish_round()

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = str(exc) or type(exc).__name__
        if not isinstance(exc, KafkaError):
            # not Kafka's doing: a bug of ours, worth its traceback (the engines go on)
            log.error("lag round failed; monitoring retries, the engines go on", exc_info=exc)
        else:
            # A new cluster or group has no coordinator for a moment: worth a warning only
            # if it lasts (the next round reports it again; /readyz shows it meanwhile).
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
