"""Helpers shared by the engine tests, the crash worker and the benchmark: topics,
bulk produce, read-everything, committed offsets."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import GroupCoordinatorNotAvailableError

from stream.config import Settings
from stream.kafka import admin_client


async def create_topic(
    settings: Settings, stem: str, partitions: int, configs: dict[str, str] | None = None
) -> str:
    name = settings.topic(f"{stem}-{uuid.uuid4().hex[:8]}")
    async with admin_client(settings.kafka, doing="creating a test topic") as admin:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs or {})])
    return name


async def produce(
    settings: Settings,
    topic: str,
    values: Sequence[bytes],
    *,
    keys: Sequence[bytes | None] | None = None,
    partition: int | None = None,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=20, acks="all"
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=keys[i] if keys else None, partition=partition)
            for i, value in enumerate(values)
        ]
        for future in futures:
            await future
    finally:
        await producer.stop()


async def read_all(
    settings: Settings, topic: str, *, isolation: str = "read_uncommitted"
) -> list[Any]:
    """Every record in `topic` up to its end offsets at the time of the call."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation,
    )
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        while not await _reached(consumer, ends):
            batch = await consumer.getmany(timeout_ms=500)
            records += [r for rs in batch.values() for r in rs]
        return records
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions, asking for metadata until the cluster knows them (a broker
    that just came back can answer metadata without its topics for a moment)."""
    with anyio.fail_after(30):
        while True:
            found = consumer.partitions_for_topic(topic)
            if found:
                return [TopicPartition(topic, p) for p in sorted(found)]
            await consumer._client.force_metadata_update()
            await anyio.sleep(0.1)  # polling the cluster's metadata, not ordering tasks


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def committed(settings: Settings, group: str, topic: str) -> dict[int, tuple[int, str]]:
    async with admin_client(settings.kafka, doing="reading committed offsets") as admin:
        for attempt in range(50):
            try:
                found = await admin.list_consumer_group_offsets(group)
                break
            except GroupCoordinatorNotAvailableError:
                # A fresh broker creates __consumer_offsets on the first group's request.
                if attempt == 49:
                    raise
                await anyio.sleep(0.2)
    return {tp.partition: (om.offset, om.metadata) for tp, om in found.items() if tp.topic == topic}


async def _reached(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True
