"""Kafka helpers for the lag tests: topics, records at given timestamps, commits as a group
with no live member, and a live member that owns partitions without committing."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.structs import OffsetAndMetadata

from stream.config import Settings
from stream.kafka import admin_client
from stream.observe.lag import LagRow
from tests.kit import run_cli


async def create_topic(settings: Settings, name: str, partitions: int) -> str:
    topic = settings.topic(name)
    async with admin_client(settings.kafka, doing="test") as admin:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    return topic


async def produce(
    settings: Settings, topic: str, partition: int, timestamps: Sequence[int]
) -> None:
    producer = AIOKafkaProducer(**settings.kafka.client_options())
    await producer.start()
    try:
        for ts in timestamps:
            await producer.send_and_wait(topic, b"{}", partition=partition, timestamp_ms=ts)
    finally:
        await producer.stop()


async def commit(
    settings: Settings, group: str, offsets: dict[TopicPartition, int], metadata: str = ""
) -> None:
    """Commit offsets as a group with no live member (as a stopped worker leaves them)."""
    # No auto-commit: it would commit the background fetch position on stop, over ours.
    consumer = AIOKafkaConsumer(
        group_id=group, enable_auto_commit=False, **settings.kafka.client_options()
    )
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(o, metadata) for tp, o in offsets.items()})
    finally:
        await consumer.stop()


@asynccontextmanager
async def live_member(settings: Settings, group: str, topic: str) -> AsyncIterator[None]:
    """A member of `group` that owns `topic`'s partitions and never commits."""
    consumer = AIOKafkaConsumer(
        topic, group_id=group, enable_auto_commit=False, **settings.kafka.client_options()
    )
    await consumer.start()
    try:
        with anyio.fail_after(30):
            while not consumer.assignment():
                await consumer.getmany(timeout_ms=100, max_records=1)
        yield
    finally:
        await consumer.stop()


def by_partition(rows: Sequence[LagRow]) -> dict[int, LagRow]:
    return {row.partition: row for row in rows}


async def lag_json(env: dict[str, str], group: str) -> list[subprocess.CompletedProcess[str]]:
    """`stream lag --json` for `group`: one look, then a window of three readings."""
    window = ("--samples", "3", "--interval", "0.1")
    return [
        await run_cli(env, "lag", "--group", group, "--json"),
        await run_cli(env, "lag", "--group", group, "--json", *window),
    ]


def parse_kafka_tool(text: str, group: str) -> dict[tuple[str, int], tuple[int, int, int]]:
    """GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG … lines of `--describe`."""
    found = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) >= 6 and cells[0] == group and cells[2].isdigit():
            found[(cells[1], int(cells[2]))] = (int(cells[3]), int(cells[4]), int(cells[5]))
    return found
