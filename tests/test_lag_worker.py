"""Lag as a running worker sees it: exactly-once leaves no phantom lag, partitions added
while it runs are consumed within a minute, and a failing lag monitor never stops the
engines."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from stream import topics
from stream.config import Settings
from stream.devtools.faults import parse_faults
from stream.devtools.simulator import SimConfig, Simulator
from stream.observe.lag import LagMonitor
from stream.observe.lagreader import GroupReading, LagReader
from stream.worker import Worker
from tests.kit import eventually, run_cli
from tests.kit.kafka import Record, produce, read_all
from tests.kit.requests import request
from tests.kit.workers import simulated_settings, worker_on

pytestmark = pytest.mark.anyio


# Kimi-K2-Thinking is down on Synthetic: its requests go through the fallback topic, which
# the primary stage writes in transactions under exactly-once (a marker after each).
FAULTS = "hf:moonshotai/Kimi-K2-Thinking=rate:1:503"
MODELS = ("deepseek-r1-0528-syn", "kimi-k2-thinking-syn", "kimi-k2-thinking-syn")


async def send(settings: Settings, partitions: Sequence[int], tag: str) -> None:
    """Three requests per partition, two of them through the fallback stage."""
    await produce(
        settings,
        settings.topic("predictions.requests"),
        [
            Record(request(f"{tag}-{p}-{i}", model, "hi"), partition=p)
            for p in partitions
            for i, model in enumerate(MODELS)
        ],
    )


def answered(settings: Settings, count: int) -> Any:
    async def check() -> bool:
        return len(await read_all(settings, settings.topic("predictions.results"))) >= count

    return check


@pytest.mark.timeout(240)
async def test_exactly_once_idle_partitions_show_no_lag_and_new_partitions_are_consumed(
    env: dict[str, str], tmp_path: Path
) -> None:
    async with Simulator(SimConfig(faults=parse_faults(FAULTS))) as sim:
        settings = simulated_settings(
            {**env, "STREAM_GUARANTEE": "exactly-once"}, sim, max_in_flight=50
        )
        # Added partitions are found at the next metadata read: every 3 s, not the 30 s
        # the worker's consumer waits by default.
        settings = replace(settings, engine=replace(settings.engine, metadata_max_age_ms=3000))
        worker = Worker(settings, ("primary", "fallback"), lag_interval_s=0.5)
        async with worker_on(worker):
            await send(settings, range(6), "before")
            await eventually(answered(settings, 18), timeout_s=60)

            async def caught_up() -> bool:  # every transaction committed, and markers skipped
                await worker.monitor.next_round()
                rows = worker.monitor.rows()
                return bool(rows) and all(r.lag == 0 and r.status == "OK" for r in rows)

            await eventually(caught_up, timeout_s=30)
            fallback = [r for r in worker.monitor.rows() if r.topic.endswith("fallback")]
            # each partition the fallback stage read ends with a transaction marker: one
            # offset past what its group committed, and that is no lag
            marked = [r for r in fallback if r.end and r.committed == r.end - 1]
            assert marked and all(r.lag == 0 for r in fallback)
            done = await run_cli(env, "lag", "--json")
            assert done.returncode == 0, done.stderr
            assert {row["lag"] for row in orjson.loads(done.stdout)} == {0}

            # `topics apply --add-partitions` while the worker runs
            bigger = tmp_path / "topics"
            shutil.copytree(settings.topics_dir, bigger)
            spec = bigger / "requests.toml"
            spec.write_text(spec.read_text().replace("partitions = 6", "partitions = 8"))
            grown = replace(settings, topics_dir=bigger)
            await topics.apply(grown, await topics.plan(grown, add_partitions=True))
            added = time.monotonic()
            await send(settings, [6, 7], "after")
            await eventually(answered(settings, 24), timeout_s=75)
            picked_up_s = time.monotonic() - added
    print(f"new partitions consumed {picked_up_s:.1f} s after they were added")
    assert picked_up_s < 30  # metadata read again in 3 s, a rebalance, a loaded machine


class _BrokenReader(LagReader):
    """Reads like the real one, then trips over a bug of ours (not a Kafka error)."""

    async def read(self, groups: Mapping[str, Sequence[str]]) -> list[GroupReading]:
        await super().read(groups)
        raise RuntimeError("a bug in the lag monitor")


class _BrokenMonitor(LagMonitor):
    def reader(self) -> LagReader:
        return _BrokenReader(self._settings)


@pytest.mark.timeout(180)
async def test_a_lag_monitor_that_fails_never_stops_the_engines(env: dict[str, str]) -> None:
    async with Simulator(SimConfig()) as sim:
        settings = simulated_settings(env, sim, max_in_flight=50)
        worker = Worker(settings, ("primary", "fallback"))
        worker.monitor = _BrokenMonitor(settings.kafka, worker.monitor.groups, interval_s=0.05)
        async with worker_on(worker):
            with anyio.fail_after(30):
                await worker.monitor.next_round()
                await worker.monitor.next_round()
            await send(settings, range(6), "during")
            await eventually(answered(settings, 18), timeout_s=60)
            errors = worker.monitor.errors
    assert errors >= 2 and worker.monitor.rounds == 0
    assert worker.monitor.last_error == "a bug in the lag monitor"
