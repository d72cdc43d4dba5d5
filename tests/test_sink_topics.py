"""The producers know the engine's topics before its first output.

aiokafka fetches a topic's metadata on the first send to it; after a start, the first
outputs of a wave then waited for it behind the wave's own work (500 answers together:
the first result ~100 ms late, `stream bench` with a burst). The sinks load the metadata
of the engine's inputs and outputs when their producers start. On a real broker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer

from stream.config import EngineSettings, Settings
from stream.engine.engine import Engine, Output
from stream.engine.outputs import AtLeastOnceSink, learn_topics
from stream.engine.transactions import ExactlyOnceSink
from tests.kit.kafka import create_topic, produce
from tests.kit.workers import engine_on

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


async def test_a_producer_learns_every_topic_in_one_go_and_a_missing_one_is_left_alone(
    settings: Settings,
) -> None:
    one = await create_topic(settings, "learn-one", 2)
    two = await create_topic(settings, "learn-two", 3)
    probe = AIOKafkaProducer(**settings.kafka.client_options())
    await probe.start()
    try:  # the broker has both in its metadata (a topic just made may lag a moment)
        assert len(await probe.partitions_for(one)) + len(await probe.partitions_for(two)) == 5
    finally:
        await probe.stop()
    producer = AIOKafkaProducer(**settings.kafka.client_options())
    await producer.start()
    try:
        cluster = producer.client.cluster
        assert cluster.partitions_for_topic(one) is None  # not before it is asked
        with anyio.fail_after(10):  # a missing topic is left to the first send
            await learn_topics(producer, [one, two, settings.topic("learn-missing")])
        assert cluster.partitions_for_topic(one) == {0, 1}
        assert cluster.partitions_for_topic(two) == {0, 1, 2}
        assert cluster.partitions_for_topic(settings.topic("learn-missing")) is None
    finally:
        await producer.stop()


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_the_engines_producers_know_its_topics_before_the_first_output(
    settings: Settings, guarantee: str
) -> None:
    source = await create_topic(settings, f"learn-in-{guarantee}", 2)
    sink = await create_topic(settings, f"learn-out-{guarantee}", 2)
    await produce(settings, source, [b"x"])
    checked, handled = anyio.Event(), anyio.Event()

    async def handler(record: Any) -> Sequence[Output]:
        await checked.wait()  # no output before the producers are looked at
        handled.set()
        return [Output(sink, record.value)]

    fields = {**dataclasses.asdict(settings.engine), "guarantee": guarantee}
    engine = Engine(
        settings=dataclasses.replace(settings, engine=EngineSettings(**fields)),
        name="t",
        group_id=settings.group(f"learn-{guarantee}"),
        topics=[source],
        handler=handler,
        on_error=lambda record, exc: [],
        output_topics=[sink],
    )
    async with engine_on(engine):
        writer = engine._sink
        if isinstance(writer, AtLeastOnceSink):
            producers = [writer._producer]
        else:
            assert isinstance(writer, ExactlyOnceSink)
            producers = [txn.producer for txn in writer._producers.values()]
        assert len(producers) == (1 if guarantee == "at-least-once" else 2)
        for producer in producers:
            # Tracked (so refreshes keep them; a producer started may also have been told
            # of every topic by its bootstrap, or not) and known now.
            assert {sink, source} <= producer.client._topics
            cluster = producer.client.cluster
            assert cluster.partitions_for_topic(sink) == {0, 1}
            assert cluster.partitions_for_topic(source) == {0, 1}  # co-partitioning asks
        checked.set()
        with anyio.fail_after(30):
            await handled.wait()
