"""Worker processes for the membership scenarios (`stream.devtools.scenarios`): `stream run
primary` processes writing JSON log lines to files, and ways to wait on them and on their
consumer group."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import orjson
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from stream.config import Settings
from stream.devtools.benchinfra import BenchError
from stream.devtools.processes import end_async
from stream.kafka import admin_client, retrying

__all__ = ["Fleet", "seconds", "settled", "until"]

_POLL_S = 0.2


class Fleet:
    """`stream run primary` processes, each writing its JSON log lines to a file."""

    def __init__(self, env: Mapping[str, str], folder: Path, *, static: bool) -> None:
        self._env = env
        self._folder = folder
        self._static = static
        self._processes: dict[str, Any] = {}
        self._logs: dict[str, Path] = {}
        self._starts = 0

    async def start(self, name: str) -> None:
        self._starts += 1
        log = self._folder / f"{self._starts:02d}-{name}.log"
        command = [sys.executable, "-m", "stream", "run", "primary"]
        if self._static:
            command += ["--instance-id", name]
        with log.open("wb") as stderr:
            self._processes[name] = await anyio.open_process(command, env=self._env, stderr=stderr)
        self._logs[name] = log

    async def stop(self, name: str) -> None:
        """SIGTERM, and wait for the drain and the exit."""
        process = self._processes[name]
        if await end_async(process, grace_s=180) != 0:
            raise BenchError(f"worker {name} exited with {process.returncode}: {self._logs[name]}")

    async def kill(self, name: str) -> None:
        await end_async(self._processes[name], sig=signal.SIGKILL)

    async def assigned(self, name: str) -> None:
        """Until the worker's current process has its partitions."""
        await until(lambda: any(e.get("kept") is not None for e in _lines(self._logs[name])))

    def events(self) -> list[dict[str, Any]]:
        return [entry for log in sorted(self._folder.glob("*.log")) for entry in _lines(log)]

    async def stop_all(self) -> None:
        """SIGTERM every worker, SIGKILL those still running 180 s later; also when the
        bench is cancelled (Ctrl-C, SIGTERM): no worker outlives it."""
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as group:
                for process in self._processes.values():
                    group.start_soon(partial(end_async, process, grace_s=180))


def seconds(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def _lines(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_bytes().splitlines():
        try:
            found.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue  # the last line of a worker that failed: not a log entry
    return found


async def until(done: Callable[[], bool], timeout_s: float = 120.0) -> None:
    with anyio.fail_after(timeout_s):
        while not done():  # noqa: ASYNC110 (state in files and other processes)
            await anyio.sleep(_POLL_S)


async def settled(settings: Settings, members: int) -> None:
    """Until the group is stable with `members` members, each with partitions."""
    group = settings.group("predictions-primary")

    async def check() -> bool:
        async with admin_client(settings.kafka, doing="describing the bench group") as admin:
            (response,) = await retrying(partial(admin.describe_consumer_groups, [group]))
        (described,) = response.to_object()["groups"]
        assigned = [
            ConsumerProtocolMemberAssignment.decode(m["member_assignment"]).partitions()
            for m in described["members"]
            if m["member_assignment"]
        ]
        return described["state"] == "Stable" and len(assigned) == members and all(assigned)

    with anyio.fail_after(120):
        while not await check():  # noqa: ASYNC110 (the broker's view, polled)
            await anyio.sleep(_POLL_S)
