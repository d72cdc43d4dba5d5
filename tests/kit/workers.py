"""The runners: an engine, or a worker against the simulator, in this process (the
worker's in-flight sampled when asked), or a worker in its own process as a user starts
it."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from stream import topics
from stream.config import Settings
from stream.devtools.simulator import Simulator
from stream.engine.engine import Engine
from stream.worker import Worker
from tests.kit.requests import send, terminal

BOTH = ("primary", "fallback")
RUN_ALL: Sequence[str | Path] = (sys.executable, "-m", "stream", "run", "all")
# Per-attempt timeouts and retries short enough that a provider fault costs a test seconds.
QUICK_FAILURES = {
    "STREAM_SYNTHETIC_TIMEOUT_S": "1",  # per attempt: a hang costs one second
    "STREAM_SYNTHETIC_MAX_RETRIES": "2",
    "STREAM_TOGETHER_MAX_RETRIES": "2",
}


def simulator_env(env: dict[str, str], sim: Simulator | str, **more: str) -> dict[str, str]:
    """`env` with both providers on the simulator (`sim`, or its base URL), then `more`.
    Synthetic is reached under /openai/v1, as its real API is."""
    base = sim if isinstance(sim, str) else sim.base
    return {
        **env,
        "SYNTHETIC_BASE_URL": f"{base}/openai/v1",
        "SYNTHETIC_API_KEY": "sim",
        "TOGETHER_BASE_URL": f"{base}/v1",
        "TOGETHER_API_KEY": "sim",
        **more,
    }


# The built-in catalog leaves three models unpriced; a spend limit needs every model priced.
_PRICES = """
[prices]
"glm-4.6-syn" = { input = 0.6, output = 2.2 }
"minimax-m2-syn" = { input = 0.3, output = 1.2 }
"qwen3-coder-480b-syn" = { input = 0.4, output = 1.6 }
"""


def priced_catalog(folder: Path) -> Path:
    """A catalog file (for STREAM_CATALOG_FILE) that prices every model, in `folder`."""
    path = folder / "catalog.toml"
    path.write_text(_PRICES)
    return path


def simulated_settings(env: dict[str, str], sim: Simulator, *, max_in_flight: int) -> Settings:
    """Both providers on the simulator, short per-attempt timeouts, few retries."""
    return Settings.from_env(
        simulator_env(env, sim, STREAM_MAX_IN_FLIGHT=str(max_in_flight), **QUICK_FAILURES)
    )


@dataclass
class Peaks:
    """The highest in-flight count each engine was seen at."""

    engine: dict[str, int] = field(default_factory=dict)

    async def sample(self, worker: Worker) -> None:
        while True:
            for engine in worker.engines:
                now = engine.snapshot().in_flight
                self.engine[engine.name] = max(self.engine.get(engine.name, 0), now)
            await anyio.sleep(0.002)  # a sampling period, not an ordering of tasks


@asynccontextmanager
async def engine_on(engine: Engine, *, deadline_s: float = 60) -> AsyncIterator[Engine]:
    """`engine` running in this process with its partitions; on the way out stopped, its
    final commit done. All of it within `deadline_s`."""
    with anyio.fail_after(deadline_s):
        async with anyio.create_task_group() as group:
            group.start_soon(engine.run)
            await engine.ready.wait()
            try:
                yield engine
            finally:
                engine.stop()


@asynccontextmanager
async def worker_on(worker: Worker, *, peaks: Peaks | None = None) -> AsyncIterator[Worker]:
    """Its topics applied, `worker` running in this process, every engine with its
    partitions; with `peaks`, the engines' in-flight sampled the whole time. On the way
    out: stop, and wait until it drained and committed."""
    await topics.apply(worker.settings, await topics.plan(worker.settings))
    async with anyio.create_task_group() as group:

        async def run() -> None:
            await worker.run()
            group.cancel_scope.cancel()  # the sampler with it

        group.start_soon(run)
        await worker.started.wait()
        for engine in worker.engines:
            with anyio.fail_after(60):
                await engine.ready.wait()
        if peaks is not None:
            group.start_soon(peaks.sample, worker)
        yield worker
        worker.stop()


@asynccontextmanager
async def worker_process(
    env: dict[str, str],
    log: Path,
    *,
    command: Sequence[str | Path] = RUN_ALL,
    cwd: Path | None = None,
) -> AsyncIterator[Process]:
    """`command` (by default `stream run all`) in its own process, its stderr in `log`.
    On the way out: SIGTERM and a wait for it to drain and exit; its exit code is
    `returncode`. On a failure, or after 60 s, it is killed, never left running."""
    with log.open("wb") as stderr:
        process = await anyio.open_process(list(command), cwd=cwd, env=env, stderr=stderr)
        try:
            yield process
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(60):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def worker_round_trip(
    command: Sequence[str | Path],
    env: dict[str, str],
    settings: Settings,
    items: list[tuple[str, bytes]],
    *,
    log: Path,
    cwd: Path | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> tuple[dict[str, tuple[str, dict[str, Any], dict[str, bytes]]], int | None]:
    """A worker process (stderr to `log`) is sent `items`; once each has its terminal
    record it gets SIGTERM. Returns the terminal records and its exit code."""
    async with worker_process(env, log, command=command, cwd=cwd) as process:
        if ready is not None:
            await ready()
        await send(settings, items)
        found = await terminal(settings, len(items))
    return found, process.returncode
