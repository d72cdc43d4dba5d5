"""What Kafka costs a Python worker per record at the least: aiokafka's own consume → produce
→ commit, with nothing of ours in between, against the engine doing the same.

    .venv/bin/python bench/kafka_floor_bench.py [--records N] [--rounds R]

Starts its own single-node broker unless KAFKA_BOOTSTRAP_SERVERS is set. Each round copies N
records of 300 bytes (about a request) from a 6-partition topic to another, at full speed,
and prints this process's CPU per record; the figure is the median of the rounds, with
their range. Runs:

- `aiokafka`: the leanest loop aiokafka allows: `getmany`, one `send` per record (an
  idempotent producer, acks=all, as the worker's), wait for the batch's acks, commit the
  batch's offsets. No flow control, no per-record task, no offsets tracker.
- `engine`: the Engine (at-least-once), a handler that returns one output at once.
- `librdkafka`: the same loop as `aiokafka` on confluent-kafka (librdkafka, in C, with its
  own threads; counted, as this process's CPU), when it is installed (it is in the dev
  extras): what a worker on another client would start from. Plain connections only.

Issue 18 asks the worker for at most 1.10× the bare HTTP loop's CPU per request: ~0.024 ms
over a 0.24 ms call. The `aiokafka` figure is the part of that no code of ours can remove.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream.config import EngineSettings, Settings
from stream.engine.engine import Engine, Output
from tests.kit.kafka import bootstrap_servers, create_topic, produce

PARTITIONS = 6
VALUE = b"x" * 300


async def _topics(settings: Settings, records: int) -> tuple[str, str]:
    run = uuid.uuid4().hex[:8]
    source = await create_topic(settings, f"floor-in-{run}", PARTITIONS)
    sink = await create_topic(settings, f"floor-out-{run}", PARTITIONS)
    await produce(settings, source, [VALUE] * records)
    return source, sink


async def run_aiokafka(settings: Settings, records: int) -> float:
    """CPU seconds per record of the leanest aiokafka copy loop."""
    source, sink = await _topics(settings, records)
    options = settings.kafka.client_options()
    consumer = AIOKafkaConsumer(
        source,
        group_id=f"floor-{uuid.uuid4().hex}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        **options,
    )
    producer = AIOKafkaProducer(enable_idempotence=True, acks="all", linger_ms=25, **options)
    await producer.start()
    await consumer.start()
    try:
        done, cpu = 0, time.process_time()
        while done < records:
            batch = await consumer.getmany(timeout_ms=100)
            if not batch:
                continue
            acks = []
            for tp, fetched in batch.items():
                for record in fetched:
                    acks.append(
                        await producer.send(
                            sink, record.value, key=record.key, partition=tp.partition
                        )
                    )
                done += len(fetched)
            for ack in acks:
                await ack
            await consumer.commit({tp: fetched[-1].offset + 1 for tp, fetched in batch.items()})
        return (time.process_time() - cpu) / records
    finally:
        await consumer.stop()
        await producer.stop()


async def run_librdkafka(settings: Settings, records: int) -> float:
    """CPU seconds per record of the same loop on librdkafka (blocking: in a thread)."""
    source, sink = await _topics(settings, records)
    copy = functools.partial(_librdkafka_copy, settings.kafka.bootstrap_servers, source, sink)
    return await anyio.to_thread.run_sync(copy, records)


def _librdkafka_copy(bootstrap: str, source: str, sink: str, records: int) -> float:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka import TopicPartition as Position

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"floor-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 25}
    )
    consumer.subscribe([source])
    try:
        done, cpu = 0, None
        while done < records:
            batch = consumer.consume(num_messages=1000, timeout=0.1)
            if not batch:
                continue
            if cpu is None:  # the group joined: from here on, as the aiokafka loop
                cpu = time.process_time()
            ends: dict[int, int] = {}
            for record in batch:
                producer.produce(
                    sink, record.value(), key=record.key(), partition=record.partition()
                )
                ends[record.partition()] = record.offset() + 1
            done += len(batch)
            producer.flush()  # every ack in
            consumer.commit(
                offsets=[Position(source, p, o) for p, o in ends.items()], asynchronous=False
            )
        assert cpu is not None
        return (time.process_time() - cpu) / records
    finally:
        consumer.close()


async def run_engine(settings: Settings, records: int) -> float:
    """CPU seconds per record of the engine copying, its handler answering at once."""
    source, sink = await _topics(settings, records)
    engine_settings = dataclasses.replace(
        settings, engine=EngineSettings(max_in_flight=1000, commit_interval_s=0.05)
    )
    handled = 0
    all_handled = anyio.Event()

    async def handler(record: Any) -> Sequence[Output]:
        nonlocal handled
        handled += 1
        if handled == records:
            all_handled.set()
        return [Output(sink, record.value, key=record.key, follows=record.partition)]

    engine = Engine(
        settings=engine_settings,
        name="floor",
        group_id=f"floor-{uuid.uuid4().hex}",
        topics=[source],
        handler=handler,
        on_error=lambda record, exc: [],
        output_topics=[sink],
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(engine.run)
        await engine.ready.wait()
        cpu = time.process_time()
        await all_handled.wait()
        while engine.snapshot().records_done < records:  # noqa: ASYNC110
            await anyio.sleep(0.005)
        spent = time.process_time() - cpu
        engine.stop()
    return spent / records


async def main(bootstrap: str, records: int, rounds: int) -> None:
    settings = dataclasses.replace(
        Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": bootstrap}),
        topic_prefix=f"floor{uuid.uuid4().hex[:6]}.",
    )
    runs = {"aiokafka": run_aiokafka, "engine": run_engine}
    if importlib.util.find_spec("confluent_kafka") is not None:
        runs["librdkafka"] = run_librdkafka
    figures: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved: the machine's mood touches each alike
        for name, run in runs.items():
            figures[name].append(await run(settings, records))
    print(f"{records} records of {len(VALUE)} bytes, {PARTITIONS} partitions, {rounds} rounds")
    for name, values in figures.items():
        us = [v * 1e6 for v in values]
        print(
            f"{name:<10} CPU per record {statistics.median(us):6.1f} µs "
            f"({min(us):.1f}–{max(us):.1f})"
        )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with bootstrap_servers() as bootstrap:
        anyio.run(main, bootstrap, args.records, args.rounds)


if __name__ == "__main__":
    cli()
