"""Brokers that end with the test session, however it ends.

A session killed (SIGTERM or SIGKILL: a CI timeout, a developer's `kill`) runs no fixture
finaliser, and its brokers, each a JVM in a session of its own, would run on, holding
memory and ports. `watch(home)` starts this module as a process that watches its parent
(twice a second: a signal from the kernel could come before Python had set a handler for
it); once the parent is gone it SIGKILLs every broker whose pid file lies under `home`.
The session's teardown stops the brokers itself, then the reaper.

    python -m tests.kit.reaper PARENT_PID HOME
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stream.devtools.processes import end_pid, running

__all__ = ["watch"]

_PID_FILE = "broker.pid"  # LocalBroker's (and so every cluster node's)
_POLL_S = 0.5


def watch(home: Path) -> subprocess.Popen[bytes]:
    """Start a reaper for the brokers under `home`; `terminate()` it after the teardown."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.kit.reaper", str(os.getpid()), str(home)],
        start_new_session=True,  # not the terminal's Ctrl-C: the session's own teardown runs
    )


def reap(home: Path) -> int:
    """SIGKILL every running broker with a pid file under `home`; how many there were."""
    killed = 0
    for pid_file in home.rglob(_PID_FILE):
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            continue
        if running(pid):
            end_pid(pid, sig=signal.SIGKILL)
            killed += 1
        pid_file.unlink(missing_ok=True)
    return killed


def main(parent: int, home: Path) -> None:
    while os.getppid() == parent:  # an orphan is handed to init (or a subreaper)
        time.sleep(_POLL_S)
    reap(home)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
