"""For the lag tests: records at given times, a live member that owns partitions without
committing, the readings `stream lag` and Kafka's own tool give, and a running `--watch`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import NamedTuple

import anyio
from aiokafka import AIOKafkaConsumer
from anyio.abc import ByteReceiveStream, Process
from anyio.streams.text import TextReceiveStream

from stream.config import Settings
from stream.observe.lag import LagRow
from tests.kit import run_cli
from tests.kit.kafka import Record


def stamped(partition: int, timestamps: Sequence[int]) -> list[Record]:
    """A record `{}` per timestamp, all on `partition`: lag in seconds is read from them."""
    return [Record(b"{}", partition=partition, timestamp_ms=ts) for ts in timestamps]


@asynccontextmanager
async def live_member(settings: Settings, group: str, topic: str) -> AsyncIterator[None]:
    """A member of `group` that owns `topic`'s partitions and never commits."""
    consumer = AIOKafkaConsumer(
        topic, group_id=group, enable_auto_commit=False, **settings.kafka.client_options()
    )
    await consumer.start()
    try:
        with anyio.fail_after(30):
            while not consumer.assignment():
                await consumer.getmany(timeout_ms=100, max_records=1)
        yield
    finally:
        await consumer.stop()


def by_partition(rows: Sequence[LagRow]) -> dict[int, LagRow]:
    return {row.partition: row for row in rows}


async def lag_json(env: dict[str, str], group: str) -> list[subprocess.CompletedProcess[str]]:
    """`stream lag --json` for `group`: one look, then a window of three readings."""
    window = ("--samples", "3", "--interval", "0.1")
    return [
        await run_cli(env, "lag", "--group", group, "--json"),
        await run_cli(env, "lag", "--group", group, "--json", *window),
    ]


def parse_kafka_tool(text: str, group: str) -> dict[tuple[str, int], tuple[int, int, int]]:
    """GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG … lines of `--describe`."""
    found = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) >= 6 and cells[0] == group and cells[2].isdigit():
            found[(cells[1], int(cells[2]))] = (int(cells[3]), int(cells[4]), int(cells[5]))
    return found


class Watch(NamedTuple):
    """A running `stream lag --watch`: the lines it printed so far, on each stream."""

    process: Process
    out: list[str]
    err: list[str]


@asynccontextmanager
async def watching(env: dict[str, str], *args: str) -> AsyncIterator[Watch]:
    """`stream lag --watch ARGS` in its own process, its output collected line by line. On
    the way out: SIGTERM, then a kill if it has not exited within 30 s."""
    command = [sys.executable, "-m", "stream", "lag", "--watch", *args]
    process = await anyio.open_process(command, env=env)
    watch = Watch(process, [], [])
    try:
        async with anyio.create_task_group() as tg:
            assert process.stdout is not None and process.stderr is not None
            tg.start_soon(_collect, process.stdout, watch.out)
            tg.start_soon(_collect, process.stderr, watch.err)
            try:
                yield watch
            finally:
                if process.returncode is None:
                    process.terminate()
                with anyio.move_on_after(30):
                    await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _collect(stream: ByteReceiveStream, into: list[str]) -> None:
    pending = ""
    async for chunk in TextReceiveStream(stream):
        pending += chunk
        *lines, pending = pending.split("\n")
        into.extend(lines)
