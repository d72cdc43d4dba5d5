"""Ending the processes the dev tools start, so that none outlives the tool.

`end` (a `subprocess.Popen`) and `end_async` (an anyio process) signal, wait a grace,
SIGKILL, and wait: on return the process is gone and reaped. `die_with_parent` (Linux)
asks the kernel to signal a child when its parent ends, even by SIGKILL, when nothing of
the parent runs to clean up. `interruptible` makes SIGTERM end a command as Ctrl-C does,
so its clean-up (context managers, `finally`) runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

__all__ = [
    "die_with_parent",
    "end",
    "end_async",
    "end_pid",
    "interruptible",
    "parent_death_signal",
    "running",
    "runs",
]

_PR_SET_PDEATHSIG = 1
_libc: Any = None
if sys.platform == "linux":
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def end(
    process: subprocess.Popen[Any], *, sig: signal.Signals = signal.SIGTERM, grace_s: float = 10.0
) -> int:
    """`sig`, up to `grace_s` to exit, then SIGKILL; the exit code once it is reaped."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
            process.send_signal(signal.SIGCONT)  # a paused one (SIGSTOP) gets it only running
        try:
            return process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def end_pid(pid: int, *, sig: signal.Signals = signal.SIGTERM, grace_s: float = 10.0) -> bool:
    """`end` for a process that is not our child (we cannot wait for it: we watch it go).
    False if it still ran 10 s after the SIGKILL."""
    for signum, wait_s in ((sig, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
            os.kill(pid, signal.SIGCONT)  # a paused one (SIGSTOP) gets it only running
        deadline = time.monotonic() + wait_s
        while running(pid):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        else:
            return True
    return False


def runs(pid: int, marker: str) -> bool:
    """Whether `pid` runs with `marker` among its arguments: a pid file outlives a reboot,
    and its number may be another process's by then. Without /proc, whether it runs."""
    if not running(pid):
        return False
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return marker.encode() in arguments


def running(pid: int) -> bool:
    """Whether `pid` runs. A zombie does not: a node another process started (a test
    session, the chaos run) stays one after we kill it, until that process reaps it."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: kill(0) has to do
    return stat.rpartition(")")[2].split()[0] != "Z"


async def end_async(
    process: Process, *, sig: signal.Signals = signal.SIGTERM, grace_s: float = 10.0
) -> int:
    """`end` for an anyio process; shielded, so a cancelled caller still leaves none."""
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            with anyio.move_on_after(grace_s):
                await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        code = await process.wait()
    return code


def parent_death_signal(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn`: the child gets `sig` when the thread that started it ends (Linux;
    elsewhere nothing). Only for children meant to end with their parent."""
    return lambda: die_with_parent(sig)


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """This process gets `sig` when its parent ends (Linux; elsewhere nothing)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within: SIGTERM raises KeyboardInterrupt, as Ctrl-C does (Python's default for
    SIGTERM ends the process at once, and no clean-up runs)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
