"""For the lag tests: records at given times, a live member that owns partitions without
committing, and the readings `stream lag` and Kafka's own tool give."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
from aiokafka import AIOKafkaConsumer

from stream.config import Settings
from stream.observe.lag import LagRow
from tests.kit import run_cli
from tests.kit.kafka import Record


def stamped(partition: int, timestamps: Sequence[int]) -> list[Record]:
    """A record `{}` per timestamp, all on `partition`: lag in seconds is read from them."""
    return [Record(b"{}", partition=partition, timestamp_ms=ts) for ts in timestamps]


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
