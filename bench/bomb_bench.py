"""How long the engine takes to step over a batch it cannot read: one zstd batch of many
small records that inflates past the bound, between two good records.

    .venv/bin/python bench/bomb_bench.py [--records N] [--rounds R]

Starts its own single-node broker unless KAFKA_BOOTSTRAP_SERVERS is set. Each round writes
a good record, the batch (N records of zeros, together 2 MiB or more, past the bound of
1 MiB) and a good record to a one-partition topic, then runs the engine
(at-least-once) until every offset is done: each of the batch's records goes to the error
path, a dead letter in the worker. Prints the seconds from the engine's start to the last
record, and records per second; the figures are the medians of the rounds, with their
range. Before the batch was stepped over a batch at a time, it was a record per fetch
round: ~25 ms each, so 200,000 took over an hour.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from aiokafka import TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream.config import EngineSettings, Settings
from stream.engine.engine import Engine, Output
from tests.kit.kafka import bootstrap_servers, create_topic, produce, produce_batch, zstd_batch

_DEADLINE_S = 600.0


async def one_round(settings: Settings, records: int) -> float:
    """Seconds from the engine's start until all `records` + 2 offsets are done."""
    source = await create_topic(settings, f"bomb-{uuid.uuid4().hex[:8]}", 1)
    await produce(settings, source, [b"before"])
    value = bytes(max(8, (2 << 20) // records))  # past the bound, however few
    await produce_batch(settings, TopicPartition(source, 0), zstd_batch([value] * records))
    await produce(settings, source, [b"after"])
    errors = 0

    async def handler(record: Any) -> Sequence[Output]:
        return []

    def on_error(record: Any, exc: BaseException) -> Sequence[Output]:
        nonlocal errors
        errors += 1
        return []

    engine = Engine(
        settings=settings,
        name="bomb",
        group_id=f"bomb-{uuid.uuid4().hex}",
        topics=[source],
        handler=handler,
        on_error=on_error,
    )
    async with anyio.create_task_group() as tasks:
        started = time.monotonic()
        tasks.start_soon(engine.run)
        with anyio.fail_after(_DEADLINE_S):  # a step-over stuck: no figure, an error
            while engine.snapshot().records_done < records + 2:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        spent = time.monotonic() - started
        engine.stop()
    assert errors == records, (errors, records)
    return spent


async def main(bootstrap: str, records: int, rounds: int) -> None:
    base = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": bootstrap})
    settings = dataclasses.replace(
        base,
        topic_prefix=f"bomb{uuid.uuid4().hex[:6]}.",
        kafka=dataclasses.replace(base.kafka, max_batch_mb=1),
        engine=EngineSettings(commit_interval_s=0.2),
    )
    seconds = [await one_round(settings, records) for _ in range(rounds)]
    rates = [records / s for s in seconds]
    print(f"one zstd batch of {records:,} records past the 1 MiB bound, {rounds} rounds")
    print(
        f"stepped over in {statistics.median(seconds):.1f} s ({min(seconds):.1f}–"
        f"{max(seconds):.1f}): {statistics.median(rates):,.0f} records/s "
        f"({min(rates):,.0f}–{max(rates):,.0f})"
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with bootstrap_servers() as bootstrap:
        anyio.run(main, bootstrap, args.records, args.rounds)


if __name__ == "__main__":
    cli()
