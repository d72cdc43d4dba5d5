"""The Kafka side of `stream bench`: its topics, the backlog it publishes, and the results
it reads back (when each was written, and what it cost)."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic

from stream.config import Settings
from stream.devtools import benchruns
from stream.kafka import admin_client
from stream.prices import Bill
from stream.stages import Topics

__all__ = [
    "BenchResults",
    "create_topics",
    "delete_topics",
    "max_window_spend",
    "publish",
    "request_value",
    "results_of",
]


async def create_topics(settings: Settings, partitions: int) -> list[str]:
    names = list(vars(Topics.of(settings)).values())
    async with admin_client(settings.kafka, doing="creating bench topics") as admin:
        await admin.create_topics([NewTopic(name, partitions, 1) for name in names])
    return names


async def delete_topics(settings: Settings, names: list[str]) -> None:
    with contextlib.suppress(Exception):  # tidying up only: a leftover topic harms nothing
        async with admin_client(settings.kafka, doing="deleting bench topics") as admin:
            await admin.delete_topics(names)


def request_value(request_id: str, index: int) -> bytes:
    return orjson.dumps(
        {
            "request_id": request_id,
            "model": benchruns.BENCH_MODEL,
            "messages": benchruns.messages(index),
            "metadata": {"bench": True},
        }
    )


async def publish(settings: Settings, requests: int, run: str) -> None:
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), acks="all", linger_ms=20, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        topic = Topics.of(settings).requests
        futures = []
        for index in range(requests):
            rid = f"{run}-{index:07d}"
            key = rid.encode()
            value = request_value(rid, index)
            headers = [("request-id", key)]
            futures.append(await producer.send(topic, value, key=key, headers=headers))
        for future in futures:
            await future
    finally:
        await producer.stop()


class BenchResults(NamedTuple):
    times: dict[bytes, int]  # request key → the result's record timestamp (ms)
    bill: Bill
    spend: list[tuple[int, float]]  # (timestamp ms, cost) per result


async def results_of(settings: Settings) -> BenchResults:
    """Every result written: when, and what it cost."""
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
        found = BenchResults({}, Bill(), [])
        while any([await consumer.position(tp) < end for tp, end in ends.items()]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    found.times[record.key] = record.timestamp
                    value = orjson.loads(record.value)
                    found.bill.add(value.get("usage"), value.get("cost_usd"))
                    found.spend.append((record.timestamp, value.get("cost_usd") or 0.0))
        return found
    finally:
        await consumer.stop()


def max_window_spend(spend: list[tuple[int, float]], window_s: float) -> tuple[float, int]:
    """(the most spent in any `window_s` of result timestamps, how many windows the run
    spanned): a sliding window over the results, as the spend limit counts it."""
    ordered = sorted(spend)
    best = total = 0.0
    start = 0
    for at, cost in ordered:
        total += cost
        while ordered[start][0] <= at - window_s * 1000:
            total -= ordered[start][1]
            start += 1
        best = max(best, total)
    span_s = (ordered[-1][0] - ordered[0][0]) / 1000 if ordered else 0.0
    return best, int(span_s // window_s) + 1
