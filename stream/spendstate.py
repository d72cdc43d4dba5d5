"""The spend window kept on disk, so a restarted worker goes on with it.

A budget's window lives in the process (`stream.spend`); a worker that restarts (a crash
loop, a deploy, a SIGKILL) would start it from nothing and could spend its limit once per
start. So while a spend limit is set, each budget's slots are written to a small file
every second they changed, and on the way out; a worker starting with the same file takes
them up again, aged by the time that passed.

    STREAM_STATE_DIR/spend.<topic prefix><instance id or "worker">.<budget>.json

The file is written whole to a temporary name and renamed over (never half a file), and
locked (`flock`) while its worker runs: a second worker with the same name on the same
machine keeps its window in memory, and says so. A file that cannot be read or written
is a warning, never a stop: the limit then holds within the process, as without it.
Kubernetes keeps such a folder across a container's restarts in an `emptyDir` volume.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import anyio
import orjson

from stream.spend import Budget

__all__ = ["SpendKeeper"]

log = logging.getLogger(__name__)

_VERSION = 1
_SAVE_EVERY_S = 1.0
_MAX_FILE_BYTES = 4 * 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class SpendKeeper:
    """Loads, then keeps writing, each budget's window to its file in `folder`."""

    def __init__(self, folder: Path, name: str, budgets: tuple[Budget, ...]) -> None:
        self._folder = folder
        self._name = _UNSAFE.sub("_", name)
        self._budgets = budgets
        self._files: dict[str, Path] = {}  # budget name → its file, for those this one holds
        self._saved: dict[str, int] = {}  # budget name → its change count when last written
        self._locks = ExitStack()

    def open(self) -> None:
        """Take each budget's file (locked) and what an earlier worker spent in it."""
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning(
                "the spend window cannot be kept in %s (%s): a restarted worker starts it "
                "from nothing; set STREAM_STATE_DIR to a folder this user may write",
                self._folder,
                exc.strerror or exc,
            )
            return
        for budget in self._budgets:
            path = self._folder / f"spend.{self._name}.{budget.name}.json"
            if self._lock(path):
                self._files[budget.name] = path
                self._load(budget, path)

    def close(self) -> None:
        self.save()
        self._locks.close()

    async def run(self) -> None:
        """Write every budget's window each second it changed (cancel to stop)."""
        while True:
            await anyio.sleep(_SAVE_EVERY_S)
            self.save()

    def save(self) -> None:
        for budget in self._budgets:
            path = self._files.get(budget.name)
            if path is None or self._saved.get(budget.name) == budget.changes:
                continue
            self._saved[budget.name] = budget.changes
            state = {
                "version": _VERSION,
                "budget": budget.name,
                "saved_at": time.time(),
                "window_s": budget.window_s,
                "slots": budget.export(),
            }
            try:
                fresh = path.with_suffix(".json.new")
                with _opened(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as file:
                    file.write(orjson.dumps(state))
                fresh.replace(path)
            except OSError as exc:
                self._files.pop(budget.name)  # said once: it is memory only from now on
                log.warning(
                    "writing the spend window to %s failed (%s): a restarted worker starts "
                    "it from nothing",
                    path,
                    exc.strerror or exc,
                )

    def _lock(self, path: Path) -> bool:
        try:
            handle = _opened(Path(f"{path}.lock"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except OSError as exc:
            log.warning("the spend window cannot be kept in %s (%s)", path, exc.strerror or exc)
            return False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            log.warning(
                "another worker on this machine keeps its spend window in %s: this one "
                "keeps its own in memory (give each worker its own STREAM_INSTANCE_ID)",
                path,
            )
            return False
        self._locks.callback(handle.close)
        return True

    def _load(self, budget: Budget, path: Path) -> None:
        try:
            raw = _read(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("reading the spend window in %s failed (%s)", path, exc.strerror or exc)
            return
        try:
            state = orjson.loads(raw)
            restored = budget.restore(_aged(state))
        # Anything a hand-edited or hostile file holds: a warning, never a stop.
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            log.warning(
                "the spend window in %s is unreadable (%s): this worker starts it from "
                "nothing, and writes it afresh",
                path,
                exc,
            )
            return
        budget.changes += 1  # written back at once, aged
        if restored:
            log.info(
                "spend window (%s) taken up from %s: $%.6g spent in the last %g s",
                budget.name,
                path,
                restored,
                budget.window_s,
            )


def _opened(path: Path, flags: int) -> IO[bytes]:
    """`path` opened for writing: never through a symlink (a folder others may write must
    not make this overwrite their target), never waiting on a FIFO (no reader: ENXIO)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    return os.fdopen(fd, "ab" if flags & os.O_APPEND else "wb")


def _read(path: Path) -> bytes:
    """The file's bytes, if it is a regular file of a sane size (the worker writes some
    100 KB at most): a FIFO would hang start-up, a huge file cost its size many times."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if status.st_size > _MAX_FILE_BYTES:
            raise OSError(errno.EFBIG, f"{status.st_size:,} bytes, over {_MAX_FILE_BYTES:,}")
        return file.read()


def _aged(state: Any) -> list[tuple[float, dict[str, float]]]:
    """The file's slots, each's age as of now (the clock's jumps back count as no time)."""
    if not isinstance(state, dict) or state.get("version") != _VERSION:
        raise ValueError(f"not a version {_VERSION} spend window")
    passed = max(0.0, time.time() - float(state["saved_at"]))
    return [(float(age) + passed, dict(by_model)) for age, by_model in state["slots"]]
