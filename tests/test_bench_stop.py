"""`stream bench` stopped by SIGTERM (`timeout 60 stream bench …`) leaves no process behind:
not its broker, its simulator, its measured run, nor anything those started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(child) for child in (task / "children").read_text().split()}
        except OSError:
            continue  # the thread ended meanwhile
    return found


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in _children(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has ended; only its parent has not reaped it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
@pytest.mark.timeout(90)
def test_sigterm_stops_the_bench_and_every_process_it_started(
    env: dict[str, str], tmp_path: Path
) -> None:
    own = {k: v for k, v in env.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}  # its own broker
    if "STREAM_CACHE_DIR" in os.environ:  # the broker's jars, fetched once
        own["STREAM_CACHE_DIR"] = os.environ["STREAM_CACHE_DIR"]
    command = [sys.executable, "-m", "stream", "bench", "--requests", "2000"]
    command += ["--latency", "1", "--runs", "stream"]
    bench = subprocess.Popen(
        command, env=own, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert bench.stderr is not None
        for line in bench.stderr:
            if line.startswith("running stream"):
                break
        else:
            pytest.fail(f"the bench ended before its run (exit {bench.wait()})")
        # the run's process, and what it starts, some moments in
        deadline = time.monotonic() + 20
        started = _descendants(bench.pid)
        while len(started) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            started = _descendants(bench.pid)
        assert len(started) >= 3, started  # broker, simulator, the measured run
        bench.send_signal(signal.SIGTERM)
        # it cleaned up as after Ctrl-C (exit 130), not ended by the signal (-15)
        assert bench.wait(30) == 130
    finally:
        if bench.poll() is None:
            bench.kill()
        bench.wait()
        if bench.stderr is not None:
            bench.stderr.close()
    deadline = time.monotonic() + 5  # a child told by the kernel (parent death) may lag
    while any(_running(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {
        pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:100] for pid in started if _running(pid)
    }
    for pid in left:  # started by this test: not left to run on after it fails
        os.kill(pid, signal.SIGKILL)
    assert not left, left
