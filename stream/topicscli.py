"""`stream topics apply`: the command line of topics as code (stream.topics)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from stream.config import Settings, seconds_option
from stream.errors import EXIT_ATTENTION, KafkaError, UsageError
from stream.topics import SETTLE_S, Change, apply, plan

__all__ = ["register"]


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    if not 0 <= args.retry_for < float("inf"):  # also refuses nan
        raise UsageError("--retry-for must be a number of seconds, 0 or more")
    changes = _with_retries(lambda: _plan_and_apply(args, settings), args.retry_for)
    drift = [change.topic for change in changes if not change.fixable]
    done = 0 if args.dry_run else sum(change.changes_something for change in changes)
    if args.json:
        print(orjson.dumps(_report(settings, changes, args.dry_run, done, drift)).decode())
    else:
        width = max(len(change.topic) for change in changes)
        for change in changes:
            print(f"{change.topic:<{width}}  {change.action:<6}  {'; '.join(change.details)}")
        print(
            "dry run: nothing changed"
            if args.dry_run
            else f"applied: {done} change{'s' if done != 1 else ''}"
        )
    if drift:
        print(f"drift left for a person: {', '.join(drift)}", file=sys.stderr)
        return EXIT_ATTENTION
    return 0


def _plan_and_apply(args: argparse.Namespace, settings: Settings) -> list[Change]:
    changes = asyncio.run(plan(settings, add_partitions=args.add_partitions))
    if not args.dry_run:
        lagging = asyncio.run(apply(settings, changes))
        if lagging:  # made, and the controller has it: a broker's metadata is behind
            print(
                f"stream topics: not every broker serves the change to {', '.join(lagging)} "
                f"after {SETTLE_S:.0f} s; it was made: check the brokers' logs if it lasts",
                file=sys.stderr,
            )
    return changes


def _with_retries(attempt: Callable[[], list[Change]], retry_for_s: float) -> list[Change]:
    """`attempt()`, tried again while Kafka fails (not starting yet, a leader election …)
    for up to `retry_for_s`: an init container or a compose service must ride out a
    broker that is still coming up. Mistakes in topics/ are not retried."""
    deadline = time.monotonic() + retry_for_s
    delay = 1.0
    while True:
        try:
            return attempt()
        except KafkaError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            wait = min(delay, left)
            print(f"stream topics: {exc}; trying again in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)  # a command line's own loop: nothing else runs meanwhile
            delay = min(delay * 2, 15.0)


def _report(
    settings: Settings, changes: list[Change], dry_run: bool, applied: int, drift: list[str]
) -> dict[str, Any]:
    """`topics apply --json`: the shape the README documents (keys are only ever added)."""
    return {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "dry_run": dry_run,
        "changes": [{"topic": c.topic, "action": c.action, "details": c.details} for c in changes],
        "applied": applied,
        "drift": drift,
    }


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "topics",
        help="make the cluster's topics match topics/",
        description="Create missing topics and set declared configs. "
        "Never deletes; reports drift it will not fix (exit 3).",
    )
    parser.add_argument("action", choices=["apply"], metavar="{apply}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument(
        "--add-partitions",
        action="store_true",
        help="raise partition counts to the declared ones (moves keys)",
    )
    parser.add_argument(
        "--retry-for",
        type=seconds_option,
        default=0.0,
        metavar="S",
        help="keep trying for up to S seconds (or 2m, 1h) while Kafka cannot be reached or fails "
        "(for init containers and compose; default 0: try once)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print {bootstrap_servers, dry_run, changes: [{topic, action, details}], "
        "applied, drift} as JSON",
    )
    parser.set_defaults(handler=_topics)
