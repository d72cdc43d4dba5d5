"""`stream lag`: the lag table for people, `--json` for scripts, `--watch` until Ctrl-C.

One reading by default (a one-shot answer, well under a second); `--samples N` takes N
readings `--interval` seconds apart, for the window statuses (STALL, UNOWNED, WARN).
Exit 3 when any partition needs a person (BEHIND, STALL, UNOWNED), 1 when a group does not
exist or Kafka does not answer in time (one line on stderr each), else 0. Every reading is
bounded in time, whatever state the cluster is in; a reading Kafka fails transiently (a broker
down, a group coordinator moving) is taken again for a while first. `--watch` goes on
through failed readings (each shown in the frame) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import anyio
import orjson

from stream.config import KafkaSettings, Settings, seconds_option
from stream.errors import EXIT_ATTENTION, EXIT_FAILED, EXIT_USAGE, KafkaError
from stream.interrupts import cancelled_by_signal
from stream.kafka import transient
from stream.observe.lag import LagRow, LagTracker
from stream.observe.lagreader import PIPELINE_GROUPS, GroupReading, LagReader, read_patiently
from stream.observe.lagstatus import ATTENTION, DEFAULT_STALL_AFTER_S, worst

__all__ = ["register", "render"]

_FETCH_TIMEOUT_S = 2.0  # to find the oldest waiting record of each partition
_ROUND_S = 10.0  # one reading, connecting included: past this, Kafka did not answer
# a one-shot reading rides out a transient failure this long: a dead broker's groups find
# another coordinator once the controllers fence it (broker.session.timeout.ms, 9 s)
_PATIENCE_S = 15.0
_MAX_INTERVAL_S = 3600.0


def register(commands: Any) -> None:
    """Add `stream lag` to the `stream` command's sub-parsers."""
    parser = commands.add_parser(
        "lag",
        help="consumer lag per group and partition, with a status over a window",
        description="Committed offset, log end, lag in records and in seconds (age of the "
        "oldest unprocessed record), and a status: OK, BEHIND (one reading: records wait "
        "longer than --stall-after), UNOWNED (records wait, no live owner), and over a window "
        "of --samples: WARN (falling behind), STALL (an owner, no progress), REWIND (the "
        "offset went back); UNKNOWN when it cannot tell. Record timestamps are hints, believed "
        "only where offsets and our own looks agree. Exit 3 on BEHIND, STALL or UNOWNED.",
    )
    parser.add_argument(
        "--group",
        action="append",
        dest="groups",
        metavar="G",
        help="a consumer group (repeatable; default predictions-primary and "
        "predictions-fallback, with STREAM_TOPIC_PREFIX applied)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    parser.add_argument(
        "--interval",
        type=seconds_option,
        default=2.0,
        metavar="S",
        help="time between samples: seconds, or 1m (default 2)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="N",
        help="readings in a window (1: a one-shot look; 3 or more tell a stall from a backlog)",
    )
    parser.add_argument(
        "--stall-after",
        type=seconds_option,
        default=DEFAULT_STALL_AFTER_S,
        metavar="S",
        help="a partition is BEHIND/STALL only once its oldest unprocessed record "
        f"is this old: seconds, or 5m, 1h (default {DEFAULT_STALL_AFTER_S:.0f}, the longest "
        "LLM call)",
    )
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace, settings: Settings) -> int:
    problem = _bad_options(args)
    if problem:
        _err(f"stream: error: {problem}")
        return EXIT_USAGE
    groups = _groups(args.groups, settings)
    rows: list[LagRow] = []
    latest: list[GroupReading] = []
    sample = partial(_sample, args, settings.kafka, groups, rows, latest)
    try:
        # Ctrl-C (or SIGTERM) cancels for good: the end of a watch, a look cut short
        interrupted = anyio.run(cancelled_by_signal, sample)
    except KeyboardInterrupt:  # before the signal handling was in place
        interrupted = True
    except TimeoutError:
        _err(f"stream: error: {_timed_out(settings.kafka)}")
        return EXIT_FAILED
    if interrupted and not args.watch:  # no reading: a script must not take it for "OK"
        _err("stream: interrupted before the lag reading was complete")
        return 130
    if not args.watch:
        _show(rows, latest, as_json=args.json, redraw=False)
    missing = [reading.group for reading in latest if not reading.exists]
    for group in missing:
        _err(_missing(group, groups[group], settings.kafka.bootstrap_servers, settings.group("")))
    if any(row.status in ATTENTION for row in rows):
        return EXIT_ATTENTION
    return EXIT_FAILED if missing else 0


def _missing(group: str, topics: tuple[str, ...], where: str, prefix: str = "") -> str:
    if topics:  # a pipeline group: its topics are not there either
        return (
            f"stream: error: consumer group {group!r} has nothing to show on {where}: its topics "
            f"({', '.join(topics)}) do not exist; create them with `stream topics apply` "
            "(and check STREAM_TOPIC_PREFIX)"
        )
    hint = ""
    if prefix and not group.startswith(prefix):  # --group takes the name as Kafka has it
        hint = f"; under STREAM_TOPIC_PREFIX the pipeline's groups are named {prefix}<group>"
    return (
        f"stream: error: consumer group {group!r} does not exist on {where} "
        f"(no members, no committed offsets){hint}"
    )


def _bad_options(args: argparse.Namespace) -> str | None:
    if args.samples < 1:
        return f"--samples must be at least 1 (got {args.samples})"
    if not 0 < args.interval <= _MAX_INTERVAL_S:  # NaN fails this too
        return (
            f"--interval must be above 0 and at most {_MAX_INTERVAL_S:.0f} s (got {args.interval})"
        )
    if not (math.isfinite(args.stall_after) and args.stall_after >= 0):
        return f"--stall-after must be a number of seconds, 0 or more (got {args.stall_after})"
    if any(not group.strip() for group in args.groups or ()):
        return "--group needs a consumer group's name (got an empty one)"
    return None


def _groups(named: list[str] | None, settings: Settings) -> dict[str, tuple[str, ...]]:
    """Each group → the topics it is known to read: the pipeline's groups read known topics
    (so their partitions show before their first commit); a named group, what Kafka says."""
    if named:
        return {group: () for group in named}
    return {
        settings.group(group): tuple(settings.topic(topic) for topic in topics)
        for group, topics in PIPELINE_GROUPS.items()
    }


async def _sample(
    args: argparse.Namespace,
    kafka: KafkaSettings,
    groups: dict[str, tuple[str, ...]],
    rows: list[LagRow],
    latest: list[GroupReading],
) -> None:
    """Take `--samples` readings `--interval` apart (forever with `--watch`) into rows; each
    reading (the first one connecting too) gets `_ROUND_S`, else `TimeoutError`. A reading
    Kafka failed transiently (a broker down, its groups' coordinator moving) is taken again
    for up to `_PATIENCE_S`; under `--watch` it is shown and taken again at the next interval."""
    tracker = LagTracker(window=args.samples, stall_after_s=args.stall_after)
    reader: LagReader | None = None
    try:
        taken = tries = 0
        while args.watch or taken < args.samples:
            if tries:
                await anyio.sleep(args.interval)
            tries += 1
            try:
                reader = reader or await _open(kafka)
                latest[:] = await read_patiently(
                    reader, groups, patience_s=0 if args.watch else _PATIENCE_S, round_s=_ROUND_S
                )
            except (KafkaError, TimeoutError) as exc:
                if not args.watch or not (isinstance(exc, TimeoutError) or transient(exc)):
                    raise
                _show_failure(exc, kafka, rows, latest, as_json=args.json, again_s=args.interval)
                continue
            rows[:] = tracker.update(latest)
            taken += 1
            if args.watch:
                _show(rows, latest, as_json=args.json, redraw=True)
    finally:
        if reader is not None:
            # closing waits on the clients' background tasks: bounded too, the answer is in
            with anyio.move_on_after(_ROUND_S, shield=True):
                await reader.__aexit__(None, None, None)


async def _open(kafka: KafkaSettings) -> LagReader:
    reader = LagReader(kafka, fetch_timeout_s=_FETCH_TIMEOUT_S)
    with anyio.fail_after(_ROUND_S):
        await reader.__aenter__()
    return reader


def _show_failure(
    exc: Exception,
    kafka: KafkaSettings,
    rows: Sequence[LagRow],
    readings: Sequence[GroupReading],
    *,
    as_json: bool,
    again_s: float,
) -> None:
    """--watch goes on through a failed reading: the last table stays, marked as old, and
    the error says why (on stderr under --json: stdout stays one JSON list a line)."""
    why = _timed_out(kafka) if isinstance(exc, TimeoutError) else str(exc)
    line = f"stream lag: reading failed ({why}); trying again in {again_s:g} s"
    if as_json:
        _err(line)
        return
    stamp = time.strftime("%H:%M:%S")
    table = render(rows, readings) + "\n" if rows else ""
    _out(
        f"{_clear()}{table}{stamp} {line}"
        + (" (the table above is the last reading)" if rows else "")
    )


def _timed_out(kafka: KafkaSettings) -> str:
    return (
        f"Kafka at {kafka.bootstrap_servers} did not answer within {_ROUND_S:.0f} s: is the "
        "broker down, still starting, paused or overloaded, or is another service on that "
        "port? (a reading connects, lists the groups' offsets and fetches one record per "
        "partition)"
    )


def _show(
    rows: Sequence[LagRow], readings: Sequence[GroupReading], *, as_json: bool, redraw: bool
) -> None:
    if as_json:
        _out(orjson.dumps([row.as_json() for row in rows]).decode())
        return
    if not rows and not redraw:
        return  # nothing to show: stderr says why
    # --watch clears the terminal: a live table, not a scrolling log
    _out((_clear() if redraw else "") + render(rows, readings))


def _clear() -> str:
    """The terminal's clear-screen, on a terminal; into a file or a pipe (`--watch | tee`),
    nothing: the readings follow one another."""
    return "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def render(rows: Sequence[LagRow], readings: Sequence[GroupReading]) -> str:
    """The table people read: one line per partition, then one per group."""
    header = ("GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "LAG-SECONDS", "STATUS")
    lines = [header] + [
        (
            row.group,
            row.topic,
            str(row.partition),
            _cell(row.committed),
            _cell(row.end),
            _cell(row.lag),
            "-" if row.lag_seconds is None else f"{row.lag_seconds:.1f}",
            row.status.value + (f" (held: {row.held})" if row.held else ""),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    for row in rows:
        if row.committed is not None and row.end is not None and row.committed > row.end:
            text.append(
                f"{row.group} committed {row.topic}[{row.partition}] at {row.committed}, past "
                f"its log end {row.end}: a worker takes the records below {row.committed} as "
                'done (the README\'s "Under faults" says why and what to do)'
            )
    for reading in readings:
        if reading.exists:
            status = worst([row.status for row in rows if row.group == reading.group])
            members = "?" if reading.members is None else str(reading.members)
            text.append(
                f"group {reading.group}: {status.value}, {members} member(s), "
                f"state {reading.state or '?'}"
            )
    return "\n".join(text)


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)
