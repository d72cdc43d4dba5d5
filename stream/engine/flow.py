"""Flow control: which queued record starts next, and which partitions keep fetching.

Capacity is bounded in total (`max_in_flight`) and per partition
(`max_in_flight_per_partition`). A partition whose queue is full is paused
(`consumer.pause`) and resumed when it drains, so memory is bounded by configuration
whatever the backlog; one slow record cannot hold more than `_MAX_SPAN_FACTOR` windows of
finished offsets behind it either.

Live first: partitions of low-priority (backfill) topics only get work from spare
capacity. They are paused while a live partition has records waiting or while in-flight is
near the limit, and their queued records are started only under the same condition.

A `Gate` (optional) may hold a topic for a reason of its own (a spend limit): its queued
records do not start, and its partitions are paused until the gate lets go (nothing is
lost: the records stay in Kafka, uncommitted). The engine knows only the reason's text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError

from stream.config import EngineSettings
from stream.engine.partitions import Partition, Record

__all__ = ["Flow", "Gate"]

# Memory bound for the offsets tracked behind one slow record (ints, not record values).
_MAX_SPAN_FACTOR = 20


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

    def _open(self) -> list[Partition]:
        """The partitions whose topic the gate lets through (all, without a gate)."""
        if self._gate is None:
            return list(self._partitions.values())
        held = {t: self._gate.holds(t) for t in {tp.topic for tp in self._partitions}}
        return [p for p in self._partitions.values() if held[p.tp.topic] is None]

    def start_ready(self) -> None:
        """Start queued records while there is capacity: live partitions first, in turns."""
        limit, per_partition = self._config.max_in_flight, self._config.max_in_flight_per_partition
        open_ = self._open()
        live = [p for p in open_ if not p.low_priority]
        low = [p for p in open_ if p.low_priority]
        for lane in (live, low):
            progress = True
            while progress and self.in_flight < limit:
                progress = False
                for partition in lane:
                    if self.in_flight >= limit or not partition.has_ready():
                        continue
                    if partition.in_flight >= per_partition:
                        continue
                    if partition.low_priority and not self.spare_capacity():
                        return
                    self.in_flight += 1
                    self._launch(partition, partition.start_next())
                    progress = True

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
        config = self._config
        total_queued = sum(p.queued for p in self._partitions.values())
        spare = self.spare_capacity()
        gate = self._gate
        for partition in self._partitions.values():
            partition.held = gate.holds(partition.tp.topic) if gate is not None else None
            pause = (
                partition.held is not None
                or partition.revoked
                or _full(partition.queued, config.max_in_flight_per_partition, partition.paused)
                or _full(total_queued, config.max_in_flight, partition.paused)
                or partition.offsets.span >= _MAX_SPAN_FACTOR * config.max_in_flight_per_partition
                or (partition.low_priority and not spare)
            )
            if pause != partition.paused:
                _set_paused(consumer, partition, pause)


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
