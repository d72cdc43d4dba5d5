"""The handover's wait, on the engine's real partitions: it ends when the records running
on the partitions it hands over finish, and a new assignment ends it at once (the group
decided again: what to hand over is the new assignment's to say). The handover across
workers on a real broker is in test_membership."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import anyio
import pytest
from aiokafka import ConsumerRecord, TopicPartition

from stream.engine.handover import Handover
from stream.engine.membership import Membership
from stream.engine.offsets import PartitionOffsets
from stream.engine.partitions import Partition
from tests.kit import eventually

pytestmark = pytest.mark.anyio

GRACE_S = 30.0  # longer than any test here may take


class _Group:
    """The part of `Membership` a handover uses: the generation, and asking to rejoin."""

    def __init__(self) -> None:
        self.generation = 1
        self.rejoins: list[set[TopicPartition]] = []
        self.partitions: dict[TopicPartition, Partition] = {}
        self.rejoined = anyio.Event()

    def rejoin(self) -> None:
        self.rejoins.append({tp for tp, p in self.partitions.items() if p.handed})
        self.rejoined.set()


def _running(tp: TopicPartition, offset: int = 0) -> tuple[Partition, ConsumerRecord[Any, Any]]:
    partition = Partition(tp, PartitionOffsets(0), low_priority=False, key_ordering=False)
    record: ConsumerRecord[Any, Any] = ConsumerRecord(
        tp.topic, tp.partition, offset, 0, 0, None, b"{}", None, 0, 2, []
    )
    assert partition.offsets.accept(offset)
    partition.enqueue(record)
    assert partition.start_next() is record
    return partition, record


def _handover(group: _Group) -> Handover:
    return Handover(group.partitions, cast(Membership, group), lambda: GRACE_S)


async def _rejoined(group: _Group) -> None:
    with anyio.fail_after(5):
        await group.rejoined.wait()


@dataclass
class _Scene:
    group: _Group
    tp: TopicPartition
    partition: Partition
    record: ConsumerRecord[Any, Any]
    handover: Handover


@asynccontextmanager
async def _one_handed_over(stopping: anyio.Event) -> AsyncIterator[_Scene]:
    """A partition with a record running, which the assignment just heard hands over;
    the handover runs until the block ends."""
    group = _Group()
    tp = TopicPartition("in", 0)
    partition, record = _running(tp)
    group.partitions[tp] = partition
    handover = _handover(group)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(handover.run, stopping)
        handover.heard({tp})
        handover.assigned()
        yield _Scene(group, tp, partition, record, handover)
        tasks.cancel_scope.cancel()


async def test_a_partition_is_handed_over_once_its_running_record_finishes() -> None:
    async with _one_handed_over(anyio.Event()) as s:
        assert s.partition.handing_over and not s.partition.has_ready()
        await anyio.sleep(0.2)
        assert not s.group.rejoins  # its record still runs
        assert s.handover.claims().owned == {s.tp: 1}
        s.partition.done(s.record)
        await _rejoined(s.group)
        assert s.group.rejoins == [{s.tp}]
        assert s.handover.claims().owned == {s.tp: 0}  # claimed idle: it moves for free


async def test_a_new_assignment_ends_the_wait_the_last_one_began() -> None:
    """The first assignment hands p0 over (its record runs on); the group decides again
    and asks for p1 instead, which is idle: p1 is handed over at once, not after p0's
    record ends (or the grace)."""
    group = _Group()
    p0, p1 = TopicPartition("in", 0), TopicPartition("in", 1)
    busy, record = _running(p0)
    idle = Partition(p1, PartitionOffsets(0), low_priority=False, key_ordering=False)
    group.partitions.update({p0: busy, p1: idle})
    handover = _handover(group)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(handover.run, stopping)
        handover.heard({p0})
        handover.assigned()
        await anyio.sleep(0.2)
        assert not group.rejoins
        group.generation = 2  # a member joined meanwhile
        handover.heard({p1})
        handover.assigned()
        assert not busy.handing_over and idle.handing_over
        await _rejoined(group)
        assert group.rejoins == [{p1}]
        assert busy.in_flight == 1  # it still runs, and stays here
        tasks.cancel_scope.cancel()
    busy.done(record)


async def test_a_worker_that_stops_meanwhile_asks_for_nothing() -> None:
    stopping = anyio.Event()
    async with _one_handed_over(stopping) as s:
        await anyio.sleep(0.1)
        stopping.set()  # a drain: it finishes the records itself
        s.partition.done(s.record)
        await anyio.sleep(0.2)
        assert not s.group.rejoins and not s.partition.handed


async def test_a_draining_worker_does_not_begin_a_handover(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An assignment heard while the worker drains: nothing is said or asked (the drain
    gives every partition back anyway), and the claims say it handed nothing over."""
    stopping = anyio.Event()
    stopping.set()
    with caplog.at_level("INFO", logger="stream.engine.handover"):
        async with _one_handed_over(stopping) as s:
            s.partition.done(s.record)
            await anyio.sleep(0.2)
    assert not caplog.records
    assert not s.group.rejoins and s.handover.claims().handed == frozenset()


async def test_a_handover_asks_the_release_and_one_called_off_gives_a_new_one() -> None:
    """Handing a partition over asks its release (its records' calls that wait go back);
    when the group decides again and the partition stays, it gets a new release and what
    was given back is ready to run here again."""
    async with _one_handed_over(anyio.Event()) as s:

        async def asked() -> bool:
            return s.partition.release.asked

        await eventually(asked)
        s.partition.give_back(s.record)  # its call was waiting for a slot
        await _rejoined(s.group)  # nothing runs: handed over at once
        s.group.generation = 2
        s.handover.heard(set())  # ...but the group decided it stays
        s.handover.assigned()
        assert not s.partition.release.asked and not s.partition.handing_over
        assert s.partition.has_ready() and s.partition.start_next() is s.record
