"""Helpers for the tests on the local three-broker cluster (the `local_cluster` fixture in
conftest.py): stop and start its nodes from async tests, find leaders, wait for replicas in
sync, and write requests that survive a leader change."""

from __future__ import annotations

import functools
import time

import anyio
from aiokafka import AIOKafkaProducer, TopicPartition

from stream.config import Settings
from stream.devtools.cluster import ClusterNode, LocalCluster, describe_partitions
from stream.stages import Topics
from tests.kit import eventually
from tests.kit.requests import request

BROKERS = 3  # the `local_cluster` fixture's size
# Synthetic's Kimi is down (FAULTS in test_cluster): odd requests go through the fallback.
MODELS = ("deepseek-v3-0324-syn", "kimi-k2-thinking-syn")


async def stop(cluster: LocalCluster, node: ClusterNode, *, kill: bool = True) -> None:
    await anyio.to_thread.run_sync(functools.partial(cluster.stop_node, node, kill=kill))


async def start(cluster: LocalCluster, node: ClusterNode) -> None:
    await anyio.to_thread.run_sync(cluster.start_node, node)


async def leader(settings: Settings, tp: TopicPartition) -> int:
    return (await describe_partitions(settings.kafka, [tp.topic]))[tp].leader


async def in_sync(settings: Settings, names: list[str], size: int, timeout_s: float = 60.0) -> None:
    """Until every partition of `names` has exactly `size` in-sync replicas."""

    async def check() -> bool:
        states = await describe_partitions(settings.kafka, names)
        return all(len(state.isr) == size for state in states.values())

    await eventually(check, timeout_s=timeout_s)


async def send(
    settings: Settings, ids: range, *, per_second: float = 0.0, until: anyio.Event | None = None
) -> range:
    """Write requests `ids`, at `per_second` when given, stopping early once `until` is
    set; the ids written. The producer is idempotent and retries across a leader change,
    so each request is written once."""
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        topic = Topics.of(settings).requests
        began = time.monotonic()
        pending = []
        for i in ids:
            if per_second:
                await anyio.sleep(max(0.0, began + (i - ids.start) / per_second - time.monotonic()))
            if until is not None and until.is_set():
                ids = range(ids.start, i)
                break
            rid = f"r-{i}"
            pending.append(
                await producer.send(
                    topic, request(rid, MODELS[i % len(MODELS)], f"question {i}"), key=rid.encode()
                )
            )
        for future in pending:
            await future
        return ids
    finally:
        await producer.stop()
