"""The test session's brokers end with it when it is killed and runs no teardown
(tests/kit/reaper.py): a stand-in "broker" (a process in a session of its own, its pid in
a broker.pid file, as LocalBroker writes it) outlives a SIGKILLed parent only until the
reaper the parent started gets the kernel's signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from stream.devtools.processes import running
from tests.kit import ROOT

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    from tests.kit.reaper import watch

    home = Path(sys.argv[1])
    watch(home)
    broker = subprocess.Popen(["sleep", "600"], start_new_session=True)
    (home / "node-1").mkdir(parents=True)
    (home / "node-1" / "broker.pid").write_text(str(broker.pid))
    print(broker.pid, flush=True)
    time.sleep(600)
    """
)


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_killed_session_takes_its_brokers_with_it(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE
    ) as parent:
        assert parent.stdout is not None
        broker = int(parent.stdout.readline())
        try:
            assert running(broker)
            parent.kill()  # no teardown runs
            parent.wait()
            assert _gone_within(broker, 15), "the broker outlived its test session"
        finally:
            if running(broker):
                os.kill(broker, signal.SIGKILL)
