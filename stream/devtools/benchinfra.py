"""What every benchmark stands on: a broker and the provider simulator in its own process
(`stream bench` and its membership scenarios both use them)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

from stream.devtools import processes
from stream.devtools.broker import LocalBroker, free_port
from stream.devtools.simulator import simulate_command
from stream.errors import StreamError

__all__ = ["KEY", "BenchError", "broker", "run_prefix", "sim_calls", "simulator"]

KEY = "sk-bench"  # the simulator's API key in every benchmark


class BenchError(StreamError):
    """A run failed or did not deliver every result."""


def run_prefix(env: Mapping[str, str], run: str) -> str:
    """The topic and group prefix of one run: the operator's STREAM_TOPIC_PREFIX first (on
    a shared cluster their prefixed ACLs cover that, nothing else), then `run` and an id."""
    return f"{env.get('STREAM_TOPIC_PREFIX', '')}{run}{uuid.uuid4().hex[:8]}."


@contextlib.contextmanager
def broker(env: Mapping[str, str]) -> Iterator[str]:
    """The cluster to use: KAFKA_BOOTSTRAP_SERVERS, or a fresh local broker stopped after."""
    external = env.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as home:
        local = LocalBroker(home=Path(home), port=free_port(), die_with_parent=True)
        print(f"starting a local Kafka broker on {local.bootstrap_servers}…", file=sys.stderr)  # noqa: T201
        local.start()
        try:
            yield local.bootstrap_servers
        finally:
            local.stop()


@contextlib.contextmanager
def simulator(latency: float, *options: str) -> Iterator[str]:
    """The simulator in its own process, so it never shares a measured event loop."""
    port = free_port()
    command = simulate_command(port, latency, "--api-key", KEY, *options)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        preexec_fn=processes.parent_death_signal(),
    )
    try:
        assert process.stdout is not None
        if not process.stdout.readline():  # "simulator listening on …": it is ready
            raise BenchError("the provider simulator did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        processes.end(process)


def sim_calls(base: str) -> int:
    return int(httpx.get(f"{base}/sim/stats", timeout=10).json()["requests"])
