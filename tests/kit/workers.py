"""A worker running against the simulator: in this process with its in-flight sampled, or
as `stream run all` in its own process."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from stream import topics
from stream.config import Settings
from stream.devtools.simulator import Simulator
from stream.worker import Worker
from tests.kit import eventually
from tests.kit.requests import send, terminal


@dataclass
class Peaks:
    """The highest in-flight count each engine was seen at."""

    engine: dict[str, int] = field(default_factory=dict)


def simulated_settings(env: dict[str, str], sim: Simulator, *, max_in_flight: int) -> Settings:
    """Both providers on the simulator, short per-attempt timeouts, few retries."""
    return Settings.from_env(
        {
            **env,
            "SYNTHETIC_BASE_URL": sim.url,
            "SYNTHETIC_API_KEY": "sim",
            "TOGETHER_BASE_URL": sim.url,
            "TOGETHER_API_KEY": "sim",
            "STREAM_MAX_IN_FLIGHT": str(max_in_flight),
            "STREAM_SYNTHETIC_TIMEOUT_S": "1",  # per attempt: a hang costs one second
            "STREAM_SYNTHETIC_MAX_RETRIES": "2",
            "STREAM_TOGETHER_MAX_RETRIES": "2",
        }
    )


@asynccontextmanager
async def running_worker(settings: Settings, peaks: Peaks) -> AsyncIterator[Worker]:
    """Both stages in this process, their in-flight sampled the whole time."""
    await topics.apply(settings, await topics.plan(settings))
    worker = Worker(settings, ("primary", "fallback"))
    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        await worker.started.wait()

        async def sample() -> None:
            while True:
                for engine in worker.engines:
                    now = engine.snapshot().in_flight
                    peaks.engine[engine.name] = max(peaks.engine.get(engine.name, 0), now)
                await anyio.sleep(0.002)

        group.start_soon(sample)
        yield worker
        worker.stop()
        await eventually(_stopped(worker))
        group.cancel_scope.cancel()


def _stopped(worker: Worker) -> object:
    async def check() -> bool:
        return all(engine.snapshot().assigned == 0 for engine in worker.engines)

    return check


@asynccontextmanager
async def worker_on(settings: Settings, worker: Worker) -> AsyncIterator[Worker]:
    """Topics applied, `worker` running in this process, every engine with its partitions."""
    await topics.apply(settings, await topics.plan(settings))
    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        await worker.started.wait()
        for engine in worker.engines:
            with anyio.fail_after(60):
                await engine.ready.wait()
        yield worker
        worker.stop()


@asynccontextmanager
async def worker_process(
    env: dict[str, str], sim: Simulator, log: Path, extra: dict[str, str] | None = None
) -> AsyncIterator[Process]:
    """`stream run all` in its own process, both providers on `sim`, its stderr in `log`.
    On the way out: SIGTERM and a wait for it to drain and exit (killed after 60 s); its
    exit code is `returncode`."""
    worker_env = {
        **env,
        "SYNTHETIC_BASE_URL": f"{sim.base}/openai/v1",
        "SYNTHETIC_API_KEY": "sim",
        "TOGETHER_BASE_URL": sim.url,
        "TOGETHER_API_KEY": "sim",
        **(extra or {}),
    }
    with log.open("wb") as stderr:
        command = [sys.executable, "-m", "stream", "run", "all"]
        process = await anyio.open_process(command, env=worker_env, stderr=stderr)
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
    command: list[str | Path],
    env: dict[str, str],
    settings: Settings,
    items: list[tuple[str, bytes]],
    *,
    log: Path,
    cwd: Path | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> tuple[dict[str, tuple[str, dict[str, Any], dict[str, bytes]]], int]:
    """A worker process (stderr to `log`) is sent `items`; once each has its terminal
    record it gets SIGTERM. Returns the terminal records and its exit code; on any
    failure it is killed, never left running."""
    with log.open("wb") as stderr:
        process = await anyio.open_process(command, cwd=cwd, env=env, stderr=stderr)
        try:
            if ready is not None:
                await ready()
            await send(settings, items)
            found = await terminal(settings, len(items))
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(60):
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    return found, code
