"""Test helpers that talk to Kafka directly, without the code under test."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import NewTopic
from aiokafka.structs import TopicPartition

from stream.config import Settings
from stream.kafka import admin_client

Record = tuple[int, bytes | None, bytes | None, int | None, list[tuple[str, bytes]]]


async def create_topics(settings: Settings, partitions: dict[str, int]) -> None:
    """Create declared topics (prefixed) with the given partition counts."""
    async with admin_client(settings.kafka, doing="test") as admin:
        await admin.create_topics(
            [NewTopic(settings.topic(name), count, 1) for name, count in partitions.items()]
        )


async def produce(settings: Settings, topic: str, records: list[Record]) -> None:
    """Write (partition, key, value, timestamp_ms, headers) records and wait for all acks."""
    producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
    await producer.start()
    try:
        pending = [
            await producer.send(
                topic, value, key=key, partition=p, timestamp_ms=ts, headers=headers
            )
            for p, key, value, ts, headers in records
        ]
        for future in pending:
            await future
    finally:
        await producer.stop()


async def read_all(settings: Settings, topic: str) -> list[Any]:
    """Every record now in `topic`, in partition then offset order."""
    async with admin_client(settings.kafka, doing="test") as admin:
        (described,) = await admin.describe_topics([topic])
    tps = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    consumer = AIOKafkaConsumer(**settings.kafka.client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return sorted(records, key=lambda r: (r.partition, r.offset))
