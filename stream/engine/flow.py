"""Flow control: which queued record starts next, and which partitions keep fetching.

Capacity is bounded in total (`max_in_flight`) and per partition
(`max_in_flight_per_partition`). A partition whose queue is full is paused
(`consumer.pause`) and resumed when it drains, so memory is bounded by configuration
whatever the backlog; one slow record cannot hold more than `_MAX_SPAN_FACTOR` windows of
finished offsets behind it either. The queues hold at most `queue_window` records in all:
enough to start the next records while a fetch is out (a local fetch takes milliseconds, a
remote one tens), not a second copy of everything in flight: at 10,000 in flight that
second copy was 10,000 fetched records more (~7 MB).

Live first: partitions of low-priority (backfill) topics only get work from spare
capacity. They are paused while a live partition has records waiting or while in-flight is
near the limit, and their queued records are started only under the same condition.

A `Gate` (optional) may hold a topic for a reason of its own (a spend limit): its queued
records do not start, and its partitions are paused until the gate lets go (nothing is
lost: the records stay in Kafka, uncommitted). The engine knows only the reason's text.

Cost per record (`after_record`, run as each record finishes): starting the next record
takes turns from where the last start left off, so with a backlog it looks at one or two
partitions, not all of them; the pause/resume walk over every partition runs once per
1/`_WALK_SHARE` of the partition count in finished records, and at most once per
`_WALK_LEAST` records or 1/`_WALK_WINDOW_SHARE` of the queue window (a walk per record
took ~4 % of a worker's CPU at 6 partitions; a resume comes at half a window, hundreds of
records before the queue runs dry), and after every fetch round (`update`), which bounds
how late a resume comes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError

from stream.config import EngineSettings
from stream.engine.partitions import Partition, Record

__all__ = ["Flow", "Gate", "queue_window"]

# Memory bound for the offsets tracked behind one slow record (ints, not record values).
_MAX_SPAN_FACTOR = 20
# Queued records in all, at most: max_in_flight up to this, a quarter of it above.
_QUEUE_FLOOR = 1000
# After a record, the pause/resume walk runs once per this share of the partitions' count
# of finished records: a walk per record cost a fifth of a worker's CPU at 96 partitions.
_WALK_SHARE = 16
# ... and at most once per this many finished records, however few the partitions ...
_WALK_LEAST = 8
# ... or per this share of the queue window, when that is more: a resume comes at half a
# window, so it is then at most a sixteenth of that half late. With a backlog, this and
# not walking the low lane once full took `after_record` from 7.5 to 5.2 µs a record.
_WALK_WINDOW_SHARE = 32


class Gate(Protocol):
    def holds(self, topic: str) -> str | None:
        """Why records of `topic` must not start now (a short word), or None to let them.
        Asked often (before starting records, on every fetch round): keep it cheap."""


class Flow:
    """Starts records while there is room, and pauses or resumes partitions to match."""

    def __init__(
        self,
        config: EngineSettings,
        partitions: dict[TopicPartition, Partition],
        launch: Callable[[Partition, Record], None],
        gate: Gate | None = None,
    ) -> None:
        self._config = config
        self._partitions = partitions  # the engine's, shared: assignment changes it
        self._launch = launch  # runs one started record (the engine spawns its task)
        self._gate = gate
        self.in_flight = 0
        self._turns = {False: 0, True: 0}  # per lane (low priority or not): whose turn is next
        self._since_walk = 0  # records finished since the last pause/resume walk
        self.queue_window = queue_window(config.max_in_flight)
        self._walk_least = max(_WALK_LEAST, self.queue_window // _WALK_WINDOW_SHARE)
        self._handing_off = False  # in after_record: the first start is handed back
        self._handoff: tuple[Partition, Record] | None = None

    def after_record(self, consumer: AIOKafkaConsumer) -> tuple[Partition, Record] | None:
        """A record finished: start what it made room for, and now and then (see the
        module docstring) pause or resume partitions.

        The first record started is handed back, not launched: the finished record's task
        runs it, so a backlog costs no task per record (creating and ending one was ~15 %
        of the engine's own CPU per record)."""
        self._handoff = None
        self._handing_off = True
        try:
            self.start_ready()
        finally:
            self._handing_off = False
        self._since_walk += 1
        if self._since_walk >= max(len(self._partitions) / _WALK_SHARE, self._walk_least):
            self.update(consumer)
        handoff, self._handoff = self._handoff, None  # not kept here once handed over
        return handoff

    def start_ready(self, most: int | None = None) -> bool:
        """Start queued records while there is capacity: live partitions first, in turns;
        at most `most` of them. True when it stopped at `most` with capacity left (more
        may wait: the caller lets the started ones run, then calls again).

        Each turn starts one record of one partition; the next call goes on from the
        partition after the last one that started, so every partition gets its turn however
        few slots each call has to give. A lane is done after a whole round without a start.
        """
        full = self._config.max_in_flight
        limit = full if most is None else min(full, self.in_flight + most)
        if self.in_flight >= limit:
            return limit < full
        partitions = list(self._partitions.values())
        held: dict[str, bool] = {}  # the gate's answer per topic, asked once per call
        for low in (False, True):
            if not self._take_turns(partitions, low, held, limit):
                return False
            if self.in_flight >= limit:
                # full: the low lane would start nothing (with a backlog, the rule)
                return limit < full
        return False

    def _take_turns(
        self, partitions: list[Partition], low: bool, held: dict[str, bool], limit: int
    ) -> bool:
        """Start records of one lane; False when the low lane ran out of spare capacity."""
        per_partition = self._config.max_in_flight_per_partition
        count, turn, idle = len(partitions), self._turns[low], 0
        while idle < count and self.in_flight < limit:
            partition = partitions[turn % count]
            turn += 1
            if (
                partition.low_priority != low
                or not partition.has_ready()
                or partition.in_flight >= per_partition
                or self._held(partition.tp.topic, held)
            ):
                idle += 1
                continue
            if low and not self.spare_capacity():
                self._turns[low] = (turn - 1) % count
                return False
            self.in_flight += 1
            if self._handing_off and self._handoff is None:
                self._handoff = (partition, partition.start_next())
            else:
                self._launch(partition, partition.start_next())
            idle = 0
        self._turns[low] = turn % count if count else 0
        return True

    def _held(self, topic: str, held: dict[str, bool]) -> bool:
        if self._gate is None:
            return False
        answer = held.get(topic)
        if answer is None:
            answer = held[topic] = self._gate.holds(topic) is not None
        return answer

    def finished(self) -> None:
        """One started record stopped running (done or abandoned)."""
        self.in_flight -= 1

    def spare_capacity(self) -> bool:
        """Room for low-priority work: no live record waits and in-flight is below 90 %."""
        limit = self._config.max_in_flight
        if self.in_flight >= limit - max(1, limit // 10):
            return False
        return not any(p.queued for p in self._partitions.values() if not p.low_priority)

    def update(self, consumer: AIOKafkaConsumer) -> None:
        """Pause partitions whose queue is full (or low-priority ones without spare room)."""
        self._since_walk = 0
        config = self._config
        total_queued = sum(p.queued for p in self._partitions.values())
        spare = self.spare_capacity()
        gate = self._gate
        reasons: dict[str, str | None] = {}  # the gate's, asked once per topic
        for partition in self._partitions.values():
            topic = partition.tp.topic
            if gate is not None and topic not in reasons:
                reasons[topic] = gate.holds(topic)
            partition.held = reasons.get(topic)
            pause = (
                partition.held is not None
                or partition.revoked
                or partition.handing_over
                or _full(partition.queued, config.max_in_flight_per_partition, partition.paused)
                or _full(total_queued, self.queue_window, partition.paused)
                or partition.offsets.span >= _MAX_SPAN_FACTOR * config.max_in_flight_per_partition
                or (partition.low_priority and not spare)
            )
            if pause != partition.paused:
                _set_paused(consumer, partition, pause)


def queue_window(max_in_flight: int) -> int:
    """How many fetched records may wait in all, for `max_in_flight` records running."""
    return min(max_in_flight, max(_QUEUE_FLOOR, max_in_flight // 4))


def _full(queued: int, window: int, paused: bool) -> bool:
    """Hysteresis: pause at a full window, resume at half, so a resumed partition's next
    fetch lands while its queue still feeds the running records."""
    return queued > window // 2 if paused else queued >= window


def _set_paused(consumer: AIOKafkaConsumer, partition: Partition, pause: bool) -> None:
    try:
        if pause:
            consumer.pause(partition.tp)
        else:
            consumer.resume(partition.tp)
    except (IllegalStateError, AssertionError):
        # Not assigned to the consumer (any more), or it has no assignment at all in the
        # middle of a rebalance (aiokafka asserts): nothing to pause.
        return
    partition.paused = pause
