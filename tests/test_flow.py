"""Flow control as pure logic: capacity bounds, live before backfill, pause and resume."""

from __future__ import annotations

import collections
from dataclasses import replace
from typing import Any

import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from stream.config import Settings
from stream.engine.flow import Flow, queue_window
from stream.engine.offsets import PartitionOffsets
from stream.engine.partitions import Partition


class Record:
    def __init__(self, offset: int) -> None:
        self.offset, self.timestamp, self.key = offset, 0, None


class Consumer:
    """What `Flow.update` needs of aiokafka's consumer: pause and resume."""

    def __init__(self) -> None:
        self.paused: set[TopicPartition] = set()

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)


def _flow(
    total: int, per_partition: int, queues: list[tuple[int, bool]]
) -> tuple[Flow, list[tuple[Partition, Any]], dict[TopicPartition, Partition]]:
    config = replace(
        Settings.from_env({}).engine,
        max_in_flight=total,
        max_in_flight_per_partition=per_partition,
    )
    partitions: dict[TopicPartition, Partition] = {}
    for index, (queued, low) in enumerate(queues):
        tp = TopicPartition("backfill" if low else "live", index)
        partition = Partition(tp, PartitionOffsets(0), low_priority=low, key_ordering=False)
        for offset in range(queued):
            assert partition.offsets.accept(offset)
            partition.enqueue(Record(offset))  # type: ignore[arg-type]
        partitions[tp] = partition
    started: list[tuple[Partition, Any]] = []
    flow = Flow(config, partitions, lambda partition, record: started.append((partition, record)))
    return flow, started, partitions


def _finish(flow: Flow, partition: Partition, record: Any) -> None:
    """A running record stops: what the engine does before `after_record`."""
    partition.done(record)
    flow.finished()


queues = st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=1, max_size=6)


@given(queues=queues, total=st.integers(1, 60), per_partition=st.integers(1, 30))
def test_start_ready_never_exceeds_the_bounds(
    queues: list[tuple[int, bool]], total: int, per_partition: int
) -> None:
    per_partition = min(per_partition, total)
    flow, started, partitions = _flow(total, per_partition, queues)
    flow.start_ready()
    assert flow.in_flight == len(started) <= total
    for partition, _ in started:
        assert partition.in_flight <= per_partition
    # Live first: backfill work starts only when no live record waits, below 90 % in flight.
    live_waiting = sum(p.queued for p in partitions.values() if not p.low_priority)
    if any(p.low_priority for p, _ in started):
        assert live_waiting == 0
        assert flow.in_flight <= total - max(1, total // 10)
    # Nothing is left waiting while there is room for it.
    if flow.in_flight < total:
        live_room = [
            p
            for p in partitions.values()
            if not p.low_priority and p.has_ready() and p.in_flight < per_partition
        ]
        assert not live_room


@given(
    queues=queues,
    total=st.integers(1, 60),
    per_partition=st.integers(1, 30),
    most=st.integers(1, 20),
)
def test_started_in_slices_the_same_records_start_as_at_once(
    queues: list[tuple[int, bool]], total: int, per_partition: int, most: int
) -> None:
    """The fetch loop starts a slice at a time (`most`), letting each run before the next:
    each call starts at most `most`, says whether more may wait, and the slices add up to
    what one call without a bound starts."""
    per_partition = min(per_partition, total)
    whole, at_once, _ = _flow(total, per_partition, queues)
    whole.start_ready()
    sliced, started, _ = _flow(total, per_partition, queues)
    calls = 0
    while True:
        before = len(started)
        more = sliced.start_ready(most)
        calls += 1
        assert len(started) - before <= most
        if not more:
            break
        assert len(started) - before == most  # it stops short only at its bound
        assert calls <= total
    assert sorted((p.tp, r.offset) for p, r in started) == sorted(
        (p.tp, r.offset) for p, r in at_once
    )


@given(total=st.integers(1, 100_000))
def test_the_queues_hold_at_most_a_window_that_keeps_up_with_the_records_in_flight(
    total: int,
) -> None:
    window = queue_window(total)
    assert 1 <= window <= total  # never more waiting than could run at once
    assert window >= min(total, 1000)  # a backlog feeds a whole round of small limits
    assert window >= total // 4  # and a quarter of a large one while the next fetch runs


@given(queued=st.lists(st.integers(0, 1500), min_size=1, max_size=6))
def test_every_partition_pauses_once_the_queues_hold_the_window_in_all(
    queued: list[int],
) -> None:
    flow, _, partitions = _flow(10_000, 10_000, [(n, False) for n in queued])
    assert flow.queue_window == 2_500
    consumer = Consumer()
    flow.update(consumer)  # type: ignore[arg-type]
    assert (consumer.paused == set(partitions)) == (sum(queued) >= flow.queue_window)


@given(queues=queues)
def test_a_full_queue_pauses_its_partition_and_a_drained_one_resumes(
    queues: list[tuple[int, bool]],
) -> None:
    flow, _, partitions = _flow(1000, 10, [(queued, False) for queued, _ in queues])
    consumer = Consumer()
    flow.update(consumer)  # type: ignore[arg-type]
    for tp, partition in partitions.items():
        assert partition.paused == (tp in consumer.paused) == (partition.queued >= 10)
    for partition in partitions.values():
        partition.drop_queued()
    flow.update(consumer)  # type: ignore[arg-type]
    assert not consumer.paused


def test_backfill_partitions_pause_while_live_work_waits() -> None:
    flow, _, _ = _flow(1000, 500, [(5, False), (5, True)])
    consumer = Consumer()
    flow.update(consumer)  # type: ignore[arg-type]
    assert consumer.paused == {TopicPartition("backfill", 1)}
    flow.start_ready()  # live records start first; then, with room, the backfill ones
    flow.update(consumer)  # type: ignore[arg-type]
    assert not consumer.paused and flow.in_flight == 10


@given(
    partitions_count=st.integers(1, 8),
    total=st.integers(1, 5),
    finishes=st.integers(0, 60),
)
def test_one_slot_at_a_time_goes_round_every_partition(
    partitions_count: int, total: int, finishes: int
) -> None:
    """A backlog everywhere, slots freed one by one: every partition gets its turn, none
    twice before the others had theirs (a slot used to go to the first partition in line)."""
    flow, started, _ = _flow(total, total, [(100, False)] * partitions_count)
    consumer = Consumer()
    flow.start_ready()
    for _ in range(finishes):
        _finish(flow, *started[len(started) - flow.in_flight])  # the oldest running
        handed = flow.after_record(consumer)  # type: ignore[arg-type]
        if handed is not None:  # the finished record's task runs it
            started.append(handed)
    counts = collections.Counter(partition.tp.partition for partition, _ in started)
    assert flow.in_flight == total
    assert max(counts.values()) - min(counts.get(p, 0) for p in range(partitions_count)) <= 1


@given(
    partitions_count=st.integers(1, 8),
    total=st.integers(1, 30),
    finishes=st.integers(1, 60),
)
def test_a_finished_record_hands_its_task_the_next_one_and_launches_only_the_rest(
    partitions_count: int, total: int, finishes: int
) -> None:
    flow, launched, partitions = _flow(total, total, [(10, False)] * partitions_count)
    consumer = Consumer()
    flow.start_ready()
    running = list(launched)
    launched.clear()
    for _ in range(min(finishes, len(running))):
        _finish(flow, *running.pop(0))
        waiting = any(p.has_ready() for p in partitions.values())
        handed = flow.after_record(consumer)  # type: ignore[arg-type]
        # one slot freed: the next record follows in the same task, none is launched
        assert not launched
        assert (handed is not None) == waiting
        if handed is not None:
            running.append(handed)
        assert flow.in_flight == len(running) <= total


@pytest.mark.parametrize(("count", "every"), [(256, 16), (64, 8), (6, 8), (1, 8)])
def test_after_a_record_the_pause_walk_runs_once_per_share_of_the_partitions(
    count: int, every: int
) -> None:
    """Once per 1/16 of the partitions in finished records, at most once per 8 records."""
    flow, started, partitions = _flow(1, 1, [(0, False)] * count)
    consumer = Consumer()
    walks = 0
    update = flow.update

    def counted(consumer: Any) -> None:
        nonlocal walks
        walks += 1
        update(consumer)

    flow.update = counted  # type: ignore[method-assign]
    for _ in range(64):
        flow.after_record(consumer)  # type: ignore[arg-type]
    assert walks == 64 // every
