"""The engine against a real broker: throughput shape, errors, flow control, lanes."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from stream.config import EngineSettings, Settings
from stream.engine import Engine, Output
from tests.enginekit import committed, create_topic, end_offsets, produce, read_all

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _with(settings: Settings, **engine: Any) -> Settings:
    fields = {**dataclasses.asdict(settings.engine), "commit_interval_s": 0.2, **engine}
    return dataclasses.replace(settings, engine=EngineSettings(**fields))


def _to_dead_letter(topic: str) -> Any:
    def on_error(record: Any, exc: BaseException) -> Sequence[Output]:
        return [Output(topic, record.value, headers=(("error", type(exc).__name__.encode()),))]

    return on_error


@asynccontextmanager
async def running(engine: Engine, deadline_s: float = 60) -> AsyncIterator[Engine]:
    """Run the engine in the background; on exit stop it and wait for its final commit."""
    with anyio.fail_after(deadline_s):
        async with anyio.create_task_group() as group:
            group.start_soon(engine.run)
            await engine.ready.wait()
            try:
                yield engine
            finally:
                engine.stop()


class Counter:
    """Counts handled records and fires an event at a target."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.seen: list[bytes] = []
        self.reached = anyio.Event()

    def add(self, value: bytes) -> None:
        self.seen.append(value)
        if len(self.seen) >= self.target:
            self.reached.set()


async def test_ten_thousand_records_six_partitions_concurrency_500(settings: Settings) -> None:
    source = await create_topic(settings, "eng-in", 6)
    sink = await create_topic(settings, "eng-out", 3)
    values = [f"r{i}".encode() for i in range(10_000)]
    await produce(settings, source, values, keys=[str(i).encode() for i in range(10_000)])
    counter = Counter(len(values))
    peak = 0

    async def handler(record: Any) -> Sequence[Output]:
        nonlocal peak
        peak = max(peak, engine.snapshot().in_flight)
        await anyio.sleep(random.uniform(0, 0.05))
        counter.add(record.value)
        return [Output(sink, record.value + b"!", key=record.key)]

    engine = Engine(
        settings=_with(settings, max_in_flight=500, max_in_flight_per_partition=200),
        name="t",
        group_id=settings.group("eng-10k"),
        topics=[source],
        handler=handler,
        on_error=_to_dead_letter(sink),
    )
    async with running(engine, deadline_s=120):
        await counter.reached.wait()

    assert sorted(counter.seen) == sorted(values)  # each handled, none twice in a clean run
    outputs = sorted(r.value for r in await read_all(settings, sink))
    assert outputs == sorted(v + b"!" for v in values)
    ends = await end_offsets(settings, source)
    assert {
        p: o for p, (o, _) in (await committed(settings, engine.group_id, source)).items()
    } == ends
    snap = engine.snapshot()
    assert (snap.records_in, snap.records_done, snap.handler_errors) == (10_000, 10_000, 0)
    assert 200 < peak <= 500  # ran concurrently, within the bound
    assert "done=10000" in repr(engine)


async def test_handler_exception_goes_to_on_error_and_worker_continues(settings: Settings) -> None:
    source = await create_topic(settings, "eng-err", 1)
    sink = await create_topic(settings, "eng-err-out", 1)
    dead = await create_topic(settings, "eng-err-dlq", 1)
    await produce(settings, source, [f"{i}".encode() for i in range(20)])
    counter = Counter(20)

    async def handler(record: Any) -> Sequence[Output]:
        counter.add(record.value)
        if int(record.value) % 5 == 0:
            raise ValueError("bad record")
        return [Output(sink, record.value)]

    engine = Engine(
        settings=_with(settings),
        name="t",
        group_id=settings.group("eng-err"),
        topics=[source],
        handler=handler,
        on_error=_to_dead_letter(dead),
    )
    async with running(engine):
        await counter.reached.wait()

    letters = await read_all(settings, dead)
    assert sorted(int(r.value) for r in letters) == [0, 5, 10, 15]
    assert all(dict(r.headers)["error"] == b"ValueError" for r in letters)
    assert len(await read_all(settings, sink)) == 16
    assert engine.snapshot().handler_errors == 4
    assert (await committed(settings, engine.group_id, source))[0][0] == 20
