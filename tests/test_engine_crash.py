"""SIGKILL a worker mid-run and restart it: nothing lost, little redone, and with
exactly-once a read_committed reader sees every output once."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
from typing import Any

import anyio
import pytest

from stream.config import Settings
from tests.kit import ROOT
from tests.kit.kafka import Record, committed, create_topic, end_offsets, produce, read_all

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

RECORDS = 1500
MAX_IN_FLIGHT = 60
COMMIT_INTERVAL_S = 0.1


async def _start(env: dict[str, str], guarantee: str, *args: str) -> Any:
    worker_env = {
        **env,
        "STREAM_GUARANTEE": guarantee,
        "STREAM_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
        "STREAM_MAX_IN_FLIGHT_PER_PARTITION": str(MAX_IN_FLIGHT // 2),
        "STREAM_COMMIT_INTERVAL_S": str(COMMIT_INTERVAL_S),
        "STREAM_SESSION_TIMEOUT_MS": "6000",
        "STREAM_REBALANCE_TIMEOUT_MS": "20000",
    }
    return await anyio.open_process(
        [sys.executable, "-m", "tests.engine_worker", *args],
        env=worker_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=None,
    )


async def _read_lines(process: Any, lines: list[str], until: int) -> None:
    """Collect the worker's handled-record lines until `until` of them arrived."""
    buffer = b""
    async for chunk in process.stdout:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        lines += [line.decode() for line in complete]
        if len(lines) >= until:
            return


async def _complete(settings: Settings, sink: str, isolation: str, want: set[bytes]) -> list[Any]:
    while True:
        outputs = await read_all(settings, sink, isolation=isolation)
        if want <= {r.value for r in outputs}:
            return outputs
        await anyio.sleep(0.3)  # polling a condition, not ordering tasks


@pytest.mark.parametrize(
    ("guarantee", "sink_partitions"),
    [
        ("at-least-once", 2),
        # As many partitions as the input's, the outputs placed by their keys' hash (as an
        # unkeyed request's result is, by its request_id): a next owner reads them all.
        ("at-least-once", 3),
        ("exactly-once", 2),
    ],
)
async def test_sigkill_mid_run_then_restart(
    settings: Settings, env: dict[str, str], guarantee: str, sink_partitions: int
) -> None:
    source = await create_topic(settings, "crash-in", 3)
    sink = await create_topic(settings, "crash-out", sink_partitions)
    group = settings.group(f"crash-{guarantee}-{sink_partitions}")
    values = [f"v{i}".encode() for i in range(RECORDS)]
    # With as many output partitions as input ones, every record in input partition 1: its
    # next owner's scan covers no other input partition's outputs, which would cover the
    # output partitions the hash chose.
    at = 1 if sink_partitions == 3 else None
    await produce(
        settings, source, [Record(v, str(i % 7).encode(), at) for i, v in enumerate(values)]
    )
    isolation = "read_committed" if guarantee == "exactly-once" else "read_uncommitted"

    with anyio.fail_after(150):
        first = await _start(env, guarantee, source, sink, group)
        handled_first: list[str] = []
        await _read_lines(first, handled_first, until=RECORDS // 3)
        first.send_signal(signal.SIGKILL)
        await first.wait()

        second = await _start(env, guarantee, source, sink, group)
        handled_second: list[str] = []
        async with anyio.create_task_group() as group_tasks:
            group_tasks.start_soon(_read_lines, second, handled_second, RECORDS * 2)
            outputs = await _complete(settings, sink, isolation, set(values))
            second.send_signal(signal.SIGTERM)  # graceful: drain, commit, close
            assert await second.wait() == 0
            group_tasks.cancel_scope.cancel()

    counts = collections.Counter(r.value for r in outputs)
    assert set(counts) == set(values)  # nothing lost
    # Each output once. Exactly-once: read_committed. At-least-once: what the dead worker
    # finished after its last commit is found by its outputs, not run again.
    assert max(counts.values()) == 1
    rehandled = len(handled_first) + len(handled_second) - RECORDS
    if guarantee == "exactly-once":
        # Re-run: what was in flight at the kill, plus what finished in the last commit
        # interval (at most MAX_IN_FLIGHT / 0.05 s * interval; its transaction aborted).
        assert 0 <= rehandled <= MAX_IN_FLIGHT + MAX_IN_FLIGHT * COMMIT_INTERVAL_S / 0.05 * 2
    else:
        # Re-run: only what was in flight at the kill (its outputs never reached Kafka).
        assert 0 <= rehandled <= MAX_IN_FLIGHT
    ends = {p: end for p, end in (await end_offsets(settings, source)).items() if end}
    assert {p: o for p, (o, _) in (await committed(settings, group, source)).items()} == ends
