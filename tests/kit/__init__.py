"""The test kit: helpers every part of the suite shares, so no test module imports another.

- here: `ROOT` (the checkout), `run_cli` (the `stream` command as a user runs it) and
  `eventually` (polling an outside system);
- `kafka`: topics, writing and reading records, end and committed offsets, commits;
- `requests`: prediction requests sent to the pipeline and its terminal records;
- `workers`: the runners: an engine or a worker in this process, a worker in its own;
- `cluster`: the local three-broker cluster's nodes, leaders and replicas;
- `lag`, `kcat`, `fakes`: the lag tests' readings, kcat as a non-Python producer, a stand-in
  engine for the metrics and health tests.

Fixtures stay in conftest.py and use these.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent.parent


async def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m stream ARGS` as a user would, and return what it printed."""
    done = await anyio.run_process([sys.executable, "-m", "stream", *args], env=env, check=False)
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 30.0) -> None:
    """Poll an outside system (Kafka metadata, a process) until `check` holds.

    For state we cannot subscribe to; in-process coordination uses events instead.
    """
    with anyio.fail_after(timeout_s):
        for _poll in itertools.count():
            if await check():
                return
            await anyio.sleep(min(0.02 * 2**_poll, 0.5))
