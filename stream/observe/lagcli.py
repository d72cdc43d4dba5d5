"""`stream lag`: the lag table for people, `--json` for scripts, `--watch` until Ctrl-C.

A status needs a window, so even a one-shot answer takes `--samples` readings
`--interval` seconds apart. Exit 3 when any partition is STALL or STOP, 1 when a group
does not exist (one line on stderr each), else 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import orjson

from stream.config import KafkaSettings, Settings
from stream.errors import EXIT_ATTENTION, EXIT_FAILED, EXIT_USAGE
from stream.observe.lag import DEFAULT_GROUPS, GroupReading, LagReader, LagRow, LagTracker
from stream.observe.lagstatus import ATTENTION, DEFAULT_STALL_AFTER_S, worst

__all__ = ["register", "render"]


def register(commands: Any) -> None:
    """Add `stream lag` to the `stream` command's sub-parsers."""
    parser = commands.add_parser(
        "lag",
        help="consumer lag per group and partition, with a status over a window",
        description="Committed offset, log end, lag in records and in seconds (age of the "
        "oldest unprocessed record), and a status over a window of samples: OK, WARN, STALL, "
        "STOP, REWIND (UNKNOWN when it cannot tell). Exit 3 when a group is STALL or STOP.",
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
        "--interval", type=float, default=2.0, metavar="S", help="seconds between samples (2)"
    )
    parser.add_argument(
        "--samples", type=int, default=3, metavar="N", help="samples in a window (3; min 2)"
    )
    parser.add_argument(
        "--stall-after",
        type=float,
        default=DEFAULT_STALL_AFTER_S,
        metavar="S",
        help="a stuck partition is STALL/STOP only once its oldest unprocessed record "
        f"is this old (default {DEFAULT_STALL_AFTER_S:.0f}, the longest LLM call)",
    )
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace, settings: Settings) -> int:
    if args.samples < 2 or args.interval <= 0:
        _err("stream lag: --samples must be at least 2 and --interval above 0")
        return EXIT_USAGE
    groups = args.groups or [settings.group(name) for name in DEFAULT_GROUPS]
    rows: list[LagRow] = []
    latest: list[GroupReading] = []
    try:
        anyio.run(_sample, args, settings.kafka, groups, rows, latest)
    except KeyboardInterrupt:  # the way out of --watch
        pass
    if not args.watch:
        _show(rows, latest, as_json=args.json, redraw=False)
    missing = [reading.group for reading in latest if not reading.exists]
    for group in missing:
        _err(
            f"stream lag: consumer group {group!r} does not exist on "
            f"{settings.kafka.bootstrap_servers} (no members, no committed offsets)"
        )
    if any(row.status in ATTENTION for row in rows):
        return EXIT_ATTENTION
    return EXIT_FAILED if missing else 0


async def _sample(
    args: argparse.Namespace,
    kafka: KafkaSettings,
    groups: list[str],
    rows: list[LagRow],
    latest: list[GroupReading],
) -> None:
    """Take `--samples` readings `--interval` apart (forever with `--watch`) into rows."""
    tracker = LagTracker(window=args.samples, stall_after_s=args.stall_after)
    async with LagReader(kafka) as reader:
        taken = 0
        while args.watch or taken < args.samples:
            if taken:
                await anyio.sleep(args.interval)
            latest[:] = await reader.read(groups)
            rows[:] = tracker.update(latest)
            taken += 1
            if args.watch:
                _show(rows, latest, as_json=args.json, redraw=True)


def _show(
    rows: Sequence[LagRow], readings: Sequence[GroupReading], *, as_json: bool, redraw: bool
) -> None:
    if as_json:
        _out(orjson.dumps([row.as_json() for row in rows]).decode())
        return
    # --watch clears the terminal: a live table, not a scrolling log
    _out(("\x1b[H\x1b[2J" if redraw else "") + render(rows, readings))


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
