"""Engine throughput against a plain one-at-a-time aiokafka loop, on a real broker.

    .venv/bin/python bench/engine_bench.py [--records N]

Starts its own single-node broker unless KAFKA_BOOTSTRAP_SERVERS is set. Each run consumes
the input, calls a handler that sleeps, produces one output per record, and commits; the
clock stops when the last offset is committed. Runs:

- `plain`: consume one record, handle, produce (wait for the ack), commit; one at a time.
- `engine`: the Engine, unordered, at-least-once.
- `cpc-case`: Confluent Parallel Consumer's published case, 10,000 records on one
  partition, handler sleeping uniform 0–5 ms, concurrency 100, unordered (2.83 s there).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream.config import EngineSettings, Settings
from stream.engine.engine import Engine, Output
from tests.kit.kafka import bootstrap_servers, committed, create_topic, end_offsets, produce


def _sleeper(low: float, high: float) -> Any:
    async def wait() -> None:
        if high > 0:
            await anyio.sleep(random.uniform(low, high))
        else:
            await anyio.lowlevel.checkpoint()

    return wait


async def _setup(settings: Settings, records: int, partitions: int) -> tuple[str, str]:
    run = uuid.uuid4().hex[:8]  # each run its own topics, under the bench's prefix
    source = await create_topic(settings, f"bench-in-{run}", partitions)
    sink = await create_topic(settings, f"bench-out-{run}", partitions)
    await produce(settings, source, [b"x" * 100] * records)
    return source, sink


async def run_plain(settings: Settings, records: int, latency: tuple[float, float]) -> float:
    source, sink = await _setup(settings, records, 6)
    options = {"bootstrap_servers": settings.kafka.bootstrap_servers}
    consumer = AIOKafkaConsumer(
        source,
        group_id=f"plain-{uuid.uuid4().hex}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **options,
    )
    producer = AIOKafkaProducer(enable_idempotence=True, acks="all", **options)
    wait = _sleeper(*latency)
    await producer.start()
    await consumer.start()
    try:
        started = time.perf_counter()
        for _ in range(records):
            record = await consumer.getone()
            await wait()
            await producer.send_and_wait(sink, record.value)
            tp = TopicPartition(record.topic, record.partition)
            await consumer.commit({tp: record.offset + 1})
        return time.perf_counter() - started
    finally:
        await consumer.stop()
        await producer.stop()


async def run_engine(
    settings: Settings,
    records: int,
    latency: tuple[float, float],
    *,
    partitions: int = 6,
    concurrency: int = 500,
) -> float:
    source, sink = await _setup(settings, records, partitions)
    group = f"engine-{uuid.uuid4().hex}"
    engine_settings = dataclasses.replace(
        settings,
        engine=EngineSettings(
            max_in_flight=concurrency,
            max_in_flight_per_partition=concurrency,
            commit_interval_s=0.05,
        ),
    )
    wait = _sleeper(*latency)
    handled = 0
    all_handled = anyio.Event()

    async def handler(record: Any) -> Sequence[Output]:
        nonlocal handled
        await wait()
        handled += 1
        if handled == records:
            all_handled.set()
        return [Output(sink, record.value)]

    engine = Engine(
        settings=engine_settings,
        name="bench",
        group_id=group,
        topics=[source],
        handler=handler,
        on_error=lambda record, exc: [],
    )
    ends = await end_offsets(settings, source)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(engine.run)
        await engine.ready.wait()
        started = time.perf_counter()  # after the group join, like the plain loop's start
        await all_handled.wait()
        # The engine has no commit event to wait on; the clock includes the last commit.
        while not _all_committed(engine, ends):  # noqa: ASYNC110
            await anyio.sleep(0.005)
        elapsed = time.perf_counter() - started
        engine.stop()
    final = await committed(settings, group, source)
    assert {p: o for p, (o, _) in final.items()} == ends, "not everything was committed"
    return elapsed


def _all_committed(engine: Engine, ends: dict[int, int]) -> bool:
    """True once the engine's last commit covers every end offset."""
    snap = engine.snapshot()
    return snap.commits > 0 and {p.partition: p.committed for p in snap.partitions} == ends


def _report(name: str, records: int, seconds: float) -> None:
    print(f"{name:<44} {records:>7} records  {seconds:7.2f} s  {records / seconds:9.0f} rec/s")


async def main(bootstrap: str, records: int) -> None:
    settings = dataclasses.replace(
        Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": bootstrap}),
        topic_prefix=f"bench{uuid.uuid4().hex[:6]}.",
    )
    plain_records = min(records, 1000)
    _report(
        "plain loop, latency 0", plain_records, await run_plain(settings, plain_records, (0, 0))
    )
    _report(
        "engine, latency 0, 6 partitions, 500", records, await run_engine(settings, records, (0, 0))
    )
    slow = min(records, 200)
    _report("plain loop, latency 100 ms", slow, await run_plain(settings, slow, (0.1, 0.1)))
    _report(
        "engine, latency 100 ms, 6 partitions, 500",
        records,
        await run_engine(settings, records, (0.1, 0.1)),
    )
    _report(
        "cpc-case: 1 partition, 0-5 ms, concurrency 100",
        10_000,
        await run_engine(settings, 10_000, (0, 0.005), partitions=1, concurrency=100),
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    args = parser.parse_args()
    with bootstrap_servers() as bootstrap:
        anyio.run(main, bootstrap, args.records)


if __name__ == "__main__":
    cli()
