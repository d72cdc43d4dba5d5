"""The at-least-once sink's own batches (`stream.engine.batches`): records finishing together
share a batch and its one ack; a full batch goes at once; a batch whose carrier is cancelled
before handing it over is still sent, once (its answers are paid for). The producer's
hand-over is the test's (no broker: its futures are resolved here); where outputs land on a
real broker: tests/test_outputs.py, tests/test_linger.py."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from anyio import wait_all_tasks_blocked
from hypothesis import given
from hypothesis import strategies as st

from stream.config import KafkaSettings
from stream.engine.batches import Batches
from stream.engine.offsets import PartitionOffsets
from stream.engine.outputs import AtLeastOnceSink, Output
from stream.engine.partitions import Partition
from tests.kit import eventually


class Handed:
    """The batches the sink handed over: (topic, partition, records in it, ack future)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int, int, asyncio.Future[Any]]] = []

    def ack_all(self) -> None:
        for *_, future in self.batches:
            if not future.done():
                future.set_result(None)


@pytest.fixture
def handed(monkeypatch: pytest.MonkeyPatch) -> Handed:
    """Every topic has 6 partitions; what the producers hand over is recorded here."""
    seen = Handed()

    async def send_batch(self: AIOKafkaProducer, batch: Any, topic: str, *, partition: int) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        seen.batches.append((topic, partition, batch._relative_offset, future))
        return future

    async def partitions_for(self: AIOKafkaProducer, topic: str) -> set[int]:
        return set(range(6))

    monkeypatch.setattr(AIOKafkaProducer, "send_batch", send_batch)
    monkeypatch.setattr(AIOKafkaProducer, "partitions_for", partitions_for)
    return seen


async def _sink(linger_ms: int, **options: Any) -> tuple[AtLeastOnceSink, Partition]:
    sink = AtLeastOnceSink(
        KafkaSettings(), consumer=None, producer_options={"linger_ms": linger_ms, **options}
    )
    await sink.stop()  # its producer never starts: `handed` takes its batches
    partition = Partition(
        TopicPartition("in", 2), PartitionOffsets(0), low_priority=False, key_ordering=False
    )
    for offset in range(10):
        assert partition.offsets.accept(offset)
    return sink, partition


@pytest.mark.anyio
async def test_records_finishing_together_share_one_batch_and_its_ack(handed: Handed) -> None:
    sink, partition = await _sink(linger_ms=50)
    async with anyio.create_task_group() as group:
        for offset in range(10):
            group.start_soon(sink.write, partition, offset, [Output("out", b"v", b"k", follows=2)])
        await eventually(_count(handed, 1), timeout_s=5)
        assert partition.offsets.watermark == 0  # handed over, not acknowledged
        handed.ack_all()
    assert [(t, p, n) for t, p, n, _ in handed.batches] == [("out", 2, 10)]
    assert partition.offsets.watermark == 10


@pytest.mark.anyio
async def test_a_full_batch_goes_at_once_without_waiting_the_linger(handed: Handed) -> None:
    sink, partition = await _sink(linger_ms=60_000, max_batch_size=1000)
    async with anyio.create_task_group() as group:
        for offset in range(3):  # 600 bytes each: two do not fit in one batch
            group.start_soon(sink.write, partition, offset, [Output("out", b"x" * 600, b"k")])
        with anyio.fail_after(5):  # not the minute of the linger
            await eventually(_count(handed, 2), timeout_s=5)
        handed.ack_all()

        async def two_finished() -> bool:
            return partition.offsets.watermark == 2

        await eventually(two_finished, timeout_s=5)
        assert [n for *_, n, _ in handed.batches] == [1, 1]  # the third waits its minute
        group.cancel_scope.cancel()  # ... or its writer's end: then it goes out (rescued)
    assert [n for *_, n, _ in handed.batches] == [1, 1, 1]


@pytest.mark.anyio
async def test_a_batch_whose_carrier_is_cancelled_still_goes_out(handed: Handed) -> None:
    """The carrier's record is abandoned (a shutdown's grace over): the batch, answers paid
    for, is handed over all the same, once; the record stays unfinished (a next owner
    finds its output by its `stream-input` header), the other writer finishes."""
    sink, partition = await _sink(linger_ms=60_000)
    finished: list[bool] = []

    async def write(offset: int) -> None:
        finished.append(await sink.write(partition, offset, [Output("out", b"v", b"k")]))

    async with anyio.create_task_group() as group:
        with anyio.CancelScope() as carrier:
            async with anyio.create_task_group() as first:
                first.start_soon(write, 0)  # opens the batch: it carries it
                await wait_all_tasks_blocked()
                group.start_soon(write, 1)  # joins it
                await wait_all_tasks_blocked()
                carrier.cancel()  # within the linger (a minute): not handed over yet
        with anyio.fail_after(5):
            await eventually(_count(handed, 1), timeout_s=5)
        handed.ack_all()
    assert [(t, n) for t, _, n, _ in handed.batches] == [("out", 2)]  # both, sent once
    assert finished == [True]  # the other writer's; the cancelled one never returned
    assert partition.offsets.watermark == 0  # 0 is unfinished: nothing past it committable
    assert partition.offsets.finished_above() == [1]


@given(
    key=st.binary(min_size=0, max_size=64),
    count=st.integers(min_value=1, max_value=64),
)
def test_a_key_is_placed_where_aiokafka_would_place_it(key: bytes, count: int) -> None:
    async def place() -> int:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")  # never started

        async def partitions_for(topic: str) -> set[int]:
            return set(range(count))

        producer.partitions_for = partitions_for  # type: ignore[method-assign]
        batches = Batches(producer, linger_s=0, max_request_size=1 << 20)
        await batches.learn("t")
        batches.close()
        await producer.stop()
        return batches.place("t", key, None, "t")

    every = list(range(count))
    assert asyncio.run(place()) == DefaultPartitioner()(key, every, every)


def _count(handed: Handed, count: int) -> Any:
    async def check() -> bool:
        return len(handed.batches) >= count

    return check
