"""The at-least-once sink says when Kafka takes none of its outputs, and holds the record
until it does. No broker here: the producer's futures are the test's to resolve (the idempotent
producer retries a refused batch for ever and only its future tells). On a real cluster
with two brokers of three down: tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import anyio
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import NotEnoughReplicasError

from stream.config import KafkaSettings
from stream.engine.offsets import PartitionOffsets
from stream.engine.outputs import AtLeastOnceSink, Output
from stream.engine.partitions import Partition
from tests.conftest import eventually

pytestmark = pytest.mark.anyio


class FakeProducer:
    """Hands out delivery futures the test resolves."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[Any]] = []

    async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future


async def _sink() -> tuple[AtLeastOnceSink, FakeProducer, Partition]:
    sink = AtLeastOnceSink(KafkaSettings(), consumer=None, producer_options={})
    await sink.stop()  # the real producer, never started, makes way for the fake
    producer = FakeProducer()
    sink._producer = producer  # type: ignore[assignment]
    sink.blocked_after_s = 0.05
    partition = Partition(
        TopicPartition("in", 0), PartitionOffsets(0), low_priority=False, key_ordering=False
    )
    assert partition.offsets.accept(0)
    return sink, producer, partition


async def test_a_late_ack_blocks_the_sink_until_it_lands(caplog: pytest.LogCaptureFixture) -> None:
    sink, producer, partition = await _sink()
    began = time.time()
    async with anyio.create_task_group() as group:
        group.start_soon(sink.write, partition, 0, [Output("out", b"v")])

        async def blocked() -> bool:
            return sink.blocked_since is not None

        await eventually(blocked, timeout_s=5)
        assert began <= (sink.blocked_since or 0) <= time.time()
        assert sink.blocked_why == "no acknowledgement in 0.05 s"
        assert partition.offsets.watermark == 0  # not finished: not committable
        producer.futures[0].set_result(None)
    assert sink.blocked_since is None
    assert partition.offsets.watermark == 1
    assert len(producer.futures) == 1  # waited for, never sent again
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (
        sum("Kafka is not taking outputs" in m for level, m in messages if level == logging.ERROR)
        == 1
    )
    assert any(m.startswith("Kafka takes outputs again") for _, m in messages)


async def test_a_refused_write_blocks_the_sink_and_is_sent_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink, producer, partition = await _sink()
    async with anyio.create_task_group() as group:
        group.start_soon(sink.write, partition, 0, [Output("out", b"v")])
        await eventually(_sent(producer, 1), timeout_s=5)
        producer.futures[0].set_exception(NotEnoughReplicasError())
        await eventually(_sent(producer, 2), timeout_s=5)
        assert "Kafka is not taking outputs (NotEnoughReplicasError)" in caplog.text
        producer.futures[1].set_result(None)
    assert sink.blocked_since is None and partition.offsets.watermark == 1


def _sent(producer: FakeProducer, count: int) -> Any:
    async def check() -> bool:
        return len(producer.futures) >= count

    return check
