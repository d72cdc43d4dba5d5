"""The sinks say when Kafka takes none of a partition's outputs (its `write_error`, which
readiness shows, and one error log line), and hold the records until it does. No broker
here: the producer's futures are the test's to resolve (the idempotent producer retries a
refused batch for ever and only its future tells). On a real cluster with two brokers of
three down: tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import NotEnoughReplicasError

from stream.config import KafkaSettings
from stream.engine import late
from stream.engine.late import watched
from stream.engine.offsets import PartitionOffsets
from stream.engine.outputs import AtLeastOnceSink, Output
from stream.engine.partitions import Partition
from tests.kit import eventually

pytestmark = pytest.mark.anyio


class FakeProducer:
    """Hands out delivery futures the test resolves, one per batch the sink hands over."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[Any]] = []

    async def send_batch(self, batch: Any, topic: str, **_: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future


@pytest.fixture(autouse=True)
def late_after_50ms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(late, "LATE_S", 0.05)


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> FakeProducer:
    """What the sinks' producers send goes to a fake that hands out the futures; every
    topic has one partition."""
    fake = FakeProducer()

    async def send_batch(self: AIOKafkaProducer, batch: Any, topic: str, **kwargs: Any) -> Any:
        return await fake.send_batch(batch, topic, **kwargs)

    async def partitions_for(self: AIOKafkaProducer, topic: str) -> set[int]:
        return {0}

    monkeypatch.setattr(AIOKafkaProducer, "send_batch", send_batch)
    monkeypatch.setattr(AIOKafkaProducer, "partitions_for", partitions_for)
    return fake


async def _sink() -> tuple[AtLeastOnceSink, Partition]:
    sink = AtLeastOnceSink(KafkaSettings(), consumer=None, producer_options={})
    await sink.stop()  # its producer never starts: `producer` answers its sends
    partition = Partition(
        TopicPartition("in", 0), PartitionOffsets(0), low_priority=False, key_ordering=False
    )
    assert partition.offsets.accept(0) and partition.offsets.accept(1)
    return sink, partition


async def test_a_late_ack_marks_the_partition_until_it_lands(
    caplog: pytest.LogCaptureFixture, producer: FakeProducer
) -> None:
    sink, partition = await _sink()
    async with anyio.create_task_group() as group:
        group.start_soon(sink.write, partition, 0, [Output("out", b"v")])
        group.start_soon(sink.write, partition, 1, [Output("out", b"w")])

        async def late() -> bool:
            return partition.write_error is not None

        await eventually(late, timeout_s=5)
        assert partition.write_error == "no acknowledgement in 0.05 s"
        assert partition.offsets.watermark == 0  # not finished: not committable
        for future in producer.futures:
            future.set_result(None)
    assert partition.write_error is None
    assert partition.offsets.watermark == 2
    assert len(producer.futures) == 1  # one batch of both, waited for, never sent again
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"Kafka takes no outputs of {partition.tp} (no acknowledgement in 0.05 s): its "
        "records stay unfinished and uncommitted until it does"
    ]  # once per partition, not once per record


async def test_a_refused_write_marks_the_partition_and_is_sent_again(
    producer: FakeProducer,
) -> None:
    sink, partition = await _sink()
    async with anyio.create_task_group() as group:
        group.start_soon(sink.write, partition, 0, [Output("out", b"v")])
        await eventually(_sent(producer, 1), timeout_s=5)
        producer.futures[0].set_exception(NotEnoughReplicasError())
        await eventually(_sent(producer, 2), timeout_s=5)
        assert partition.write_error in ("NotEnoughReplicasError", "no acknowledgement in 0.05 s")
        producer.futures[1].set_result(None)
    assert partition.write_error is None and partition.offsets.watermark == 1


def _sent(producer: FakeProducer, count: int) -> Any:
    async def check() -> bool:
        return len(producer.futures) >= count

    return check


async def test_a_late_commit_marks_the_partition_and_its_error_stays_its_own() -> None:
    _, partition = await _sink()
    release = anyio.Event()

    async def commit() -> None:
        await release.wait()
        raise NotEnoughReplicasError()

    async def run() -> None:
        with pytest.raises(NotEnoughReplicasError):  # not an exception group
            await watched(commit, partition)

    async with anyio.create_task_group() as group:
        group.start_soon(run)

        async def marked() -> bool:
            return partition.write_error is not None

        await eventually(marked, timeout_s=5)
        assert partition.write_error == "transaction not committed in 0.05 s"
        release.set()


async def test_a_prompt_commit_marks_nothing() -> None:
    _, partition = await _sink()

    async def commit() -> None:
        pass

    await watched(commit, partition)
    assert partition.write_error is None
