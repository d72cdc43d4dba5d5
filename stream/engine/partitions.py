"""The engine's state for one assigned partition: what waits, what runs, what is finished.

A `Partition` holds the records fetched but not started (`queued`), counts those running,
and owns the `PartitionOffsets` tracker that says what may be committed. With per-key
ordering, a record whose key is busy waits in that key's own line and joins the queue
when the record before it finishes, so one slow key never blocks the others.

A rebalance puts a partition **on probation** (`probation`): nothing new starts, running
records go on but hold their outputs (`kept` waits) until the group decides. If the
partition comes back (`resume`), they write and it carries on where it was; if it moved
(`abandon`), they write nothing and stop.

The group may ask for a partition to be **handed over** (`handing_over`): it stays ours,
writing and committing, but nothing new starts on it; once its running records finish
(`handed`), the engine asks for the rebalance that moves it (`stream.engine.assignor`).

The snapshots an engine gives of itself (`EngineSnapshot`) and of each partition
(`PartitionSnapshot`) live here too: what metrics and health read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, NamedTuple, TypeAlias

import anyio
from aiokafka import ConsumerRecord, TopicPartition
from anyio import TaskHandle

from stream.engine.offsets import METADATA_MAX_CHARS, PartitionOffsets, with_notes
from stream.release import Release

log = logging.getLogger(__name__)

__all__ = ["EngineSnapshot", "Partition", "PartitionSnapshot", "Record", "Runner"]

Record: TypeAlias = "ConsumerRecord[Any, Any]"


class Runner:
    """The task running a record of a partition (and then, maybe, records of others)."""

    __slots__ = ("handle",)

    def __init__(self) -> None:
        self.handle: TaskHandle[None] | None = None

    def cancel(self) -> None:
        """Cancel the task: the record it runs now stops, and the task ends."""
        if self.handle is not None:
            self.handle.cancel()


class PartitionSnapshot(NamedTuple):
    topic: str
    partition: int
    in_flight: int
    next_offset: int  # the committable watermark
    finished_uncommitted: int
    paused: bool
    oldest_in_flight_timestamp_ms: int | None
    # Seconds the oldest write of outputs has waited for Kafka (None: none waiting), and
    # the last error Kafka gave for this partition's outputs since they last went through.
    oldest_write_s: float | None = None
    write_error: str | None = None
    committed: int | None = None  # the offset the last commit wrote (None: none yet)
    held: int = 0  # answered records whose outputs wait for a rebalance's verdict


class EngineSnapshot(NamedTuple):
    name: str
    group_id: str
    guarantee: str
    assigned: int
    in_flight: int
    records_in: int
    records_done: int
    handler_errors: int
    commits: int
    last_commit_seconds: float  # Unix time of the last successful commit, 0.0 before
    partitions: tuple[PartitionSnapshot, ...]
    # Records started again that a previous owner had started (a crash, a rebalance): each
    # may be a provider call paid for twice.
    records_redelivered: int = 0
    # Records a drain gave back before their call went out (nothing paid): not finished,
    # not committed, for the next owner.
    records_released: int = 0
    # Running records abandoned because their partition left (a rebalance moved it, or
    # the shutdown grace ran out): their next owner runs them, and pays for them, again.
    abandoned: int = 0
    rebalances: int = 0  # rebalances that revoked this engine's partitions
    # Records a dead owner finished after its last commit, found by their outputs in
    # Kafka (at-least-once): not run, nor paid for, again.
    records_recovered: int = 0


class Partition:
    """One assigned partition: its queue, its running records and its offsets."""

    def __init__(
        self,
        tp: TopicPartition,
        offsets: PartitionOffsets,
        *,
        low_priority: bool,
        key_ordering: bool,
        started_before: int = -1,
    ) -> None:
        self.tp = tp
        self.offsets = offsets
        # A previous owner started every offset below this (its `started` note): running
        # one of them again may pay for a call twice.
        self.started_before = started_before
        self.started_high = -1  # one past the highest offset this owner started
        # Started, then given back unpaid (a drain, or a handover: `give_back`), and not
        # started again since.
        self.released: set[int] = set()
        # Its records' leave to give calls that wait to go out back (`stream.release`):
        # asked when it is handed over; a new one when it stays after all.
        self.release = Release()
        self.held: str | None = None  # why the engine's gate holds this partition
        self.low_priority = low_priority
        self.key_ordering = key_ordering
        self.paused = False
        self.revoked = False  # no new work: on probation, or leaving this worker
        self.abandoned = False  # it left: runs still going write nothing
        # The group asked for it elsewhere once its running records finish: nothing new
        # starts (`has_ready`); `handed`: they finished (or the wait ran out), and the next
        # join claims it with nothing running, so it moves.
        self.handing_over = False
        self.handed = False
        # A graceful stop finished (or gave back) every record of it: no output of it can
        # land after the final commit, which then needs no `since` note.
        self.drained = False
        self._verdict: anyio.Event | None = None  # set while on probation, fired on the verdict
        self.waiting: set[int] = set()  # offsets whose outputs wait for the verdict
        self.committed: tuple[int, str] | None = None  # last (offset, metadata) committed
        # The same without its `since` note: a commit is due when the position moves.
        self.committed_base: tuple[int, str] | None = None
        self.committed_at = 0.0  # when (monotonic) this owner last committed
        self.reset_seen = False  # a record below the committed offset came (`skipped`)
        # An output of it was placed by its key's hash, not at the input's partition number
        # (by this owner, or by one before it, per its `spread` note): a next owner must
        # look in every output partition (`stream.engine.recovery`).
        self.spread = False
        self.running: dict[int, int] = {}  # offset → record timestamp, for the snapshot
        self.writes: dict[int, float] = {}  # offset → when its outputs' write began (monotonic)
        self._writes_done: anyio.Event | None = None  # made only for a revoke that waits
        self.write_error: str | None = None  # the last refusal since outputs last went through
        # Acks awaited (future → when the wait began, loop time) and the one timer that
        # looks for a late one (`stream.engine.late`): no timer per output.
        self.acks: dict[object, float] = {}
        self.late_watch: asyncio.TimerHandle | None = None
        self.runners: set[Runner] = set()  # the tasks running its records: abandon cancels
        self.idle = anyio.Event()  # set whenever nothing of this partition is running
        self.idle.set()
        self._ready: deque[Record] = deque()
        self._blocked: dict[bytes, deque[Record]] = {}  # busy key → records behind it
        self._blocked_count = 0

    @property
    def queued(self) -> int:
        """Records fetched and accepted but not started."""
        return len(self._ready) + self._blocked_count

    @property
    def in_flight(self) -> int:
        return len(self.running)

    def has_ready(self) -> bool:
        return bool(self._ready) and not (self.revoked or self.handing_over)

    def enqueue(self, record: Record) -> None:
        key = record.key if self.key_ordering else None
        if key is not None and key in self._blocked:
            self._blocked[key].append(record)
            self._blocked_count += 1
        else:
            if key is not None:
                self._blocked[key] = deque()  # the key is now busy until this one finishes
            self._ready.append(record)

    def start_next(self) -> Record:
        record = self._ready.popleft()
        if self.released:
            self.released.discard(record.offset)  # given back, and now started again
        # a stand-in for an undecodable record has no timestamp: count it from now
        stamp = record.timestamp if record.timestamp >= 0 else int(time.time() * 1000)
        self.running[record.offset] = stamp
        self.started_high = max(self.started_high, record.offset + 1)
        self.idle = anyio.Event() if self.idle.is_set() else self.idle
        return record

    def skipped(self, offset: int) -> None:
        """A fetched record was not run (finished before). One below the committed offset
        means Kafka reset the position: that offset is past the log end. Said once."""
        if self.committed_base is None or offset >= self.committed_base[0] or self.reset_seen:
            return
        self.reset_seen = True
        committed = self.committed_base[0]
        log.warning(
            "%s[%d]: Kafka moved the position from the committed offset %d to %d: %d is past "
            "the log end (the log lost records, in an unclean leader election, or the offset "
            "was set by hand). Records below %d are taken as done and not run, new ones too "
            "until the log passes it; to run them, set the group's offset (kafka-consumer-"
            "groups.sh --reset-offsets) with the workers stopped",
            self.tp.topic,
            self.tp.partition,
            committed,
            offset,
            committed,
            committed,
        )

    def done(self, record: Record) -> None:
        """The record stopped running (finished or abandoned): release its key and slot."""
        if self.running.pop(record.offset, None) is None:
            return  # given back (`give_back`): queued again, its key still busy
        key = record.key if self.key_ordering else None
        if key is not None and key in self._blocked:
            behind = self._blocked[key]
            if behind:
                self._blocked_count -= 1
                # Older than anything fetched since, so it goes to the front of the line.
                self._ready.appendleft(behind.popleft())
            else:
                del self._blocked[key]
        if not self.running:
            self.idle.set()

    def give_back(self, record: Record) -> None:
        """A started record gave its call back unpaid (`RecordReleased`): it is unfinished
        and goes back to the front of the queue, its key still busy (nothing of its key
        overtakes it). It starts again if the partition stays after all (a handover the
        group called off); else it is dropped with the queue, uncommitted, for the next
        owner."""
        self.running.pop(record.offset, None)
        self.released.add(record.offset)
        self._ready.appendleft(record)
        if not self.running:
            self.idle.set()

    def drop_queued(self) -> int:
        """Forget records not started (the partition is leaving); they stay uncommitted."""
        dropped = self.queued
        self._ready.clear()
        self._blocked.clear()
        self._blocked_count = 0
        return dropped

    def position(self, extra: dict[str, str] | None = None) -> tuple[int, str]:
        """(offset, metadata) to commit: the watermark, finished offsets above it, notes
        (and `extra` ones)."""
        notes = dict(extra or {})
        started = max(self.started_high, self.started_before)
        # Records given back unpaid at the top of what was started are not "started": the
        # next owner must not count them as calls perhaps paid twice (nor finished ones
        # among them, which it skips).
        top, offsets = started - 1, self.offsets
        while top >= offsets.watermark and (top in self.released or offsets.finished(top)):
            top -= 1
        started = top + 1
        if started > self.offsets.watermark:
            notes["started"] = str(started)
        if self.held:
            notes["held"] = self.held
        room = METADATA_MAX_CHARS - len(with_notes("", notes))
        return self.offsets.watermark, with_notes(self.offsets.metadata(room), notes)

    def oldest_running_timestamp(self) -> int | None:
        return min(self.running.values(), default=None)

    def oldest_write_s(self, now: float) -> float | None:
        """How long the oldest unfinished write of outputs has waited (monotonic `now`)."""
        started = min(self.writes.values(), default=None)
        return None if started is None else now - started

    def begin_write(self, offset: int, now: float) -> None:
        self.writes[offset] = now

    def end_write(self, offset: int) -> None:
        self.writes.pop(offset, None)
        if not self.writes and self._writes_done is not None:
            self._writes_done.set()
            self._writes_done = None

    async def no_writes(self) -> None:
        """Until no write of outputs is under way (an event is made only when one is: a
        write per record would otherwise make one per record)."""
        if not self.writes:
            return
        if self._writes_done is None:
            self._writes_done = anyio.Event()
        await self._writes_done.wait()

    @property
    def on_probation(self) -> bool:
        return self._verdict is not None

    def probation(self) -> None:
        """Revoked by a rebalance: start nothing new, hold outputs until the verdict."""
        self.revoked = True
        if self._verdict is None:
            self._verdict = anyio.Event()

    def resume(self) -> None:
        """The partition came back: carry on; held outputs are written now. The consumer's
        new assignment starts unpaused."""
        self.revoked = self.paused = False
        self._settle()

    async def kept(self, holding: int | None = None) -> bool:
        """Whether this worker still owns the partition, waiting out a probation (`holding`:
        the offset of a record whose outputs wait meanwhile). Returns at once, without
        yielding, when there is none: a caller's next step then runs before any rebalance
        callback can."""
        if self._verdict is None:
            return not self.abandoned
        if holding is not None:
            self.waiting.add(holding)
        try:
            while self._verdict is not None:
                await self._verdict.wait()
        finally:
            self.waiting.discard(holding)
        return not self.abandoned

    def abandon(self) -> int:
        """The partition left: cancel whatever still runs (it stays unfinished, for the
        next owner). Returns how many records were running."""
        self.abandoned = True  # a run that ignores its cancellation must not write now
        for runner in self.runners:
            runner.cancel()
        self._settle()
        return len(self.runners)

    def _settle(self) -> None:
        verdict, self._verdict = self._verdict, None
        if verdict is not None:
            verdict.set()

    def snapshot(self) -> PartitionSnapshot:
        return PartitionSnapshot(
            topic=self.tp.topic,
            partition=self.tp.partition,
            in_flight=self.in_flight,
            next_offset=self.offsets.watermark,
            finished_uncommitted=self.offsets.finished_uncommitted,
            paused=self.paused,
            oldest_in_flight_timestamp_ms=self.oldest_running_timestamp(),
            oldest_write_s=self.oldest_write_s(time.monotonic()),
            write_error=self.write_error,
            committed=self.committed[0] if self.committed else None,
            held=len(self.waiting),
        )
