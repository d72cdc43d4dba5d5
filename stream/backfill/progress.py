"""Progress a person can watch on stderr, and a pacer for `--rate`.

On a terminal the progress line is rewritten in place a few times a second; anywhere else
(a CI log, `2> file`) it is a plain line every few seconds, because carriage returns
turn a log file into one unreadable line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TextIO, TypeVar

import anyio
import orjson

from stream.errors import FencedError, StreamError, UsageError
from stream.interrupts import cancelled_by_signal

__all__ = [
    "STALL_S",
    "Pacer",
    "Progress",
    "add_json_option",
    "parse_rate",
    "run_resumable",
    "run_summarised",
]

Clock = Callable[[], float]

# Without a record done for this long, a run says it is waiting (a broker gone, a leader
# moving, a transaction stuck): it waits on, Kafka's clients retry, and it carries on once
# they get through; a person watching knows why the line stopped.
STALL_S = 30.0


class Progress:
    """Records done out of a total, with the rate so far and the time left at that rate.
    Used as a context manager (in a running event loop), it also says when no record got
    done for `stall_s`."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        out: TextIO | None = None,
        clock: Clock = time.monotonic,
        stall_s: float = STALL_S,
        unit: str = "records",
    ) -> None:
        self.label = label
        self.unit = unit
        self.total = total
        self.done = 0
        self._out = out or sys.stderr
        self._clock = clock
        self._started = clock()
        self._tty = self._out.isatty()
        # in place: often enough to look alive; as lines: rarely enough to stay readable
        self._every = 0.2 if self._tty else 5.0
        self._shown = self._started
        self._stall_s = stall_s
        self._moved_at = self._started  # when the last record got done
        self._warned_at = self._started  # no stall line before this
        self._watch: asyncio.TimerHandle | None = None

    def __enter__(self) -> Progress:
        loop = asyncio.get_running_loop()
        self._watch = loop.call_later(self._stall_s / 3, self._look, loop)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _look(self, loop: asyncio.AbstractEventLoop) -> None:
        """A few times per `stall_s`: say so, once per `stall_s`, while nothing got done."""
        now = self._clock()
        waited = now - self._moved_at
        if self.done < self.total and waited >= self._stall_s and now >= self._warned_at:
            self._warned_at = now + self._stall_s
            self._out.write(
                f"{chr(10) if self._tty else ''}{self.label}: nothing done for {waited:.0f} s"
                " (is Kafka reachable?): waiting; Ctrl-C stops, and the same command again"
                " carries on\n"
            )
            self._out.flush()
        self._watch = loop.call_later(self._stall_s / 3, self._look, loop)

    def __repr__(self) -> str:
        return f"<Progress {self.label} {self.done}/{self.total}>"

    @property
    def rate(self) -> float:
        elapsed = self._clock() - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        percent = f" ({100 * self.done // self.total}%)" if self.total else ""
        left = max(0, self.total - self.done)
        eta = f", ETA {_duration(left / rate)}" if rate > 0 and left else ""
        return f"{self.label}: {self.done}/{self.total} {self.unit}{percent}, {rate:,.0f}/s{eta}"

    def advance(self, count: int) -> None:
        self.done += count
        now = self._moved_at = self._clock()
        if now - self._shown >= self._every:
            self._shown = now
            self._show()

    def finish(self) -> None:
        self._show()
        if self._tty:
            self._out.write("\n")
        self._out.flush()

    def _show(self) -> None:
        if self._tty:
            self._out.write(f"\r\x1b[K{self.line()}")
        else:
            self._out.write(f"{self.line()}\n")
        self._out.flush()


class Pacer:
    """At most `rate` records per second: record n goes no earlier than start + n / rate."""

    def __init__(self, rate: float | None, *, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._start: float | None = None
        self._sent = 0

    async def wait(self) -> None:
        """Return when the next record may go (at once when there is no limit)."""
        if self.rate is None:
            return
        now = self._clock()
        if self._start is None:
            self._start = now
        due = self._start + self._sent / self.rate
        self._sent += 1
        if due > now:
            await anyio.sleep(due - now)


# One record a minute at the least (a run that looks stuck, on purpose, past that), and
# no more than a worker could ever take: beyond it, leave the rate out.
_LEAST_RATE, _MOST_RATE = 1 / 60, 1_000_000


def parse_rate(text: str | None) -> float | None:
    """`--rate 200` or `--rate 200/s` as records per second."""
    if text is None:
        return None
    try:
        rate = float(text.strip().removesuffix("/s"))
    except ValueError:
        raise UsageError(
            f"--rate {text!r} is not a rate: use records per second, e.g. 200/s"
        ) from None
    if not _LEAST_RATE <= rate <= _MOST_RATE:  # nan and inf too
        raise UsageError(
            f"--rate must be between {_LEAST_RATE:g} and {_MOST_RATE:,.0f} records per second "
            f"(got {text}); leave it out for no limit"
        )
    return rate


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def run_resumable(
    job: Callable[[], Coroutine[Any, Any, None]],
    summary: Callable[[str], str],
    finished: str,
    *,
    begun: Callable[[], bool] = lambda: False,
) -> int:
    """Run a resumable copy (replay, redrive) for the CLI: a summary either way, and on
    Ctrl-C the hint that running the same command again carries on where it stopped.
    A run that fails once `begun()` (its plan made) prints its summary too, outcome
    `failed` (what Kafka committed stays), before the error's one line."""
    try:
        # the CLI edge owns the event loop; Ctrl-C cancels the job for good
        interrupted = anyio.run(cancelled_by_signal, job)
    except KeyboardInterrupt:  # before the job's signal handling was in place
        interrupted = True
    except StreamError as exc:
        if begun():
            print(summary("failed"))  # noqa: T201
            if not isinstance(exc, FencedError):  # its line says to let the other run finish
                hint = "stream: what was committed stays; the same command again carries on"
                print(hint, file=sys.stderr)  # noqa: T201
        raise
    if interrupted:
        print(summary("interrupted"))  # noqa: T201
        hint = "stream: interrupted; run the same command again to continue"
        print(hint, file=sys.stderr)  # noqa: T201
        return 130
    print(summary(finished))  # noqa: T201
    return 0


def add_json_option(parser: argparse.ArgumentParser, shape: str) -> None:
    """`--json`, whose help shows the `shape` of the summary it prints."""
    parser.add_argument("--json", action="store_true", help=f"print the summary as JSON: {shape}")


class Resumable(Protocol):
    """A replay or a re-drive: a run that carries on where the last one stopped."""

    async def run(self) -> None: ...

    def begun(self) -> bool:
        """Whether it made its plan (its summary has something to say)."""


R = TypeVar("R", bound=Resumable)


def run_summarised(
    args: argparse.Namespace,
    run: R,
    report: Callable[[R, str], dict[str, Any]],
    summary: Callable[[R, str], str],
    *,
    dry_run_done: str,
) -> int:
    """`run_resumable` with the summary `--json` and `--dry-run` ask for: the `report`
    as JSON (its outcome `done` either way), else the `summary` table, ending on
    `dry_run_done` after a dry run."""
    if args.json:
        return run_resumable(
            run.run,
            lambda outcome: orjson.dumps(report(run, outcome)).decode(),
            "done",
            begun=run.begun,
        )
    finished = dry_run_done if args.dry_run else "done"
    return run_resumable(run.run, lambda outcome: summary(run, outcome), finished, begun=run.begun)
