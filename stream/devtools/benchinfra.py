"""What every benchmark stands on: a broker, the provider simulator in its own process,
fresh topics, and the results read back with their timestamps."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from stream.config import Settings
from stream.devtools.broker import LocalBroker, free_port
from stream.devtools.simulator import simulate_command
from stream.errors import StreamError
from stream.kafka import admin_client
from stream.stages import Topics

__all__ = [
    "KEY",
    "BenchError",
    "broker",
    "create_topics",
    "delete_topics",
    "result_times",
    "sim_calls",
    "simulator",
]

KEY = "sk-bench"  # the simulator's API key in every benchmark


class BenchError(StreamError):
    """A run failed or did not deliver every result."""


@contextlib.contextmanager
def broker() -> Iterator[str]:
    """The cluster to use: KAFKA_BOOTSTRAP_SERVERS, or a fresh local broker stopped after."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as home:
        local = LocalBroker(home=Path(home), port=free_port())
        print(f"starting a local Kafka broker on {local.bootstrap_servers}…", file=sys.stderr)  # noqa: T201
        local.start()
        try:
            yield local.bootstrap_servers
        finally:
            local.stop()


@contextlib.contextmanager
def simulator(latency: float, *options: str) -> Iterator[str]:
    """The simulator in its own process, so it never shares a measured event loop."""
    port = free_port()
    command = simulate_command(port, latency, "--api-key", KEY, *options)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        if not process.stdout.readline():  # "simulator listening on …": it is ready
            raise BenchError("the provider simulator did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def sim_calls(base: str) -> int:
    return int(httpx.get(f"{base}/sim/stats", timeout=10).json()["requests"])


async def create_topics(settings: Settings, partitions: int) -> list[str]:
    names = list(vars(Topics.of(settings)).values())
    async with admin_client(settings.kafka, doing="creating bench topics") as admin:
        await admin.create_topics([NewTopic(name, partitions, 1) for name in names])
    return names


async def delete_topics(settings: Settings, names: list[str]) -> None:
    with contextlib.suppress(Exception):  # tidying up only: a leftover topic harms nothing
        async with admin_client(settings.kafka, doing="deleting bench topics") as admin:
            await admin.delete_topics(names)


async def result_times(settings: Settings) -> dict[bytes, int]:
    """Request key → its result's record timestamp (ms), for every result written."""
    topic = Topics.of(settings).results
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(),
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        times: dict[bytes, int] = {}
        while any([await consumer.position(tp) < end for tp, end in ends.items()]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                times.update((r.key, r.timestamp) for r in records)
        return times
    finally:
        await consumer.stop()
