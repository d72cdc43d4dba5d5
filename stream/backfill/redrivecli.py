"""`stream redrive` on the command line: its options, and the summary it prints (a table,
or `--json`). The run itself is `stream.backfill.redrive`."""

from __future__ import annotations

import argparse
from typing import Any

from stream.backfill.progress import add_json_option, run_summarised
from stream.backfill.redrive import (
    DEAD_LETTER,
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_ATTEMPTS,
    GROUP,
    HOPELESS,
    OUTCOMES,
    REASONS,
    Redrive,
    RedriveOptions,
)
from stream.backfill.window import parse_age, parse_time
from stream.config import Settings
from stream.errors import UsageError

__all__ = ["register", "report"]

# Each outcome's key in the --json summary.
_KEYS = {name: name.replace(" ", "_") for name in OUTCOMES}


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "redrive",
        help="send dead letters back to be run again (each once)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Re-publish dead letters whose request parsed to the requests topic, with "
        "attempt + 1 and a\nredriven-from header. Safe to run again: progress is committed per "
        f"reason in the group\n{GROUP} in one transaction with the requests, so nothing is "
        "re-driven twice; a second\nrun started meanwhile fences this one (it stops, exit 1) "
        "and carries on.\n"
        "Reasons that cannot succeed as sent are skipped unless --force:\n"
        f"{', '.join(sorted(HOPELESS))}.\n"
        "A request that had a deadline gets a fresh one (--deadline); one that already ran\n"
        "--max-attempts times is not sent again. One that cannot be sent (nested too deeply\n"
        "to write back as JSON, larger than the target takes) is listed with why, not sent.",
        epilog="examples:\n"
        "  stream redrive --dry-run\n"
        "  stream redrive --reason fallback_failed --reason expired --since 6h\n"
        "  stream redrive --to predictions.backfill --since 2025-06-01T00:00:00Z\n"
        "  stream redrive --reason unknown_model --force    (after adding the model)\n"
        "times: RFC 3339 with a zone (Z or +02:00), `now`, or an age: 30m, 2h, 1d",
    )
    parser.add_argument(
        "--reason",
        action="append",
        metavar="R",
        help=f"only this reason (repeatable; default all): {', '.join(REASONS)}",
    )
    parser.add_argument(
        "--since", metavar="T", help="skip dead letters before T (default: the oldest kept)"
    )
    parser.add_argument("--until", metavar="T", help="stop at dead letters from T (default: now)")
    parser.add_argument(
        "--to",
        dest="target",
        default="predictions.requests",
        choices=["predictions.requests", "predictions.backfill"],
        help="where to send them (default predictions.requests; backfill runs on spare capacity)",
    )
    parser.add_argument("--force", action="store_true", help="also reasons that cannot succeed")
    parser.add_argument(
        "--deadline",
        metavar="AGE",
        default=f"{DEFAULT_DEADLINE_S // 3600}h",
        help="a re-driven request that had a deadline gets this long from now "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        metavar="N",
        default=DEFAULT_MAX_ATTEMPTS,
        help="pass over, for good, requests that already ran N times, by their attempt "
        "header (default %(default)s)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count what would happen, send nothing"
    )
    add_json_option(
        parser,
        "{source, target, group, dry_run, force, outcome, reasons: {REASON: {"
        + ", ".join(_KEYS.values())
        + "}}, total, not_sent: [{partition, offset, reason, why}]}",
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, settings: Settings) -> int:
    run = Redrive(settings=settings, options=_options(args, settings))
    return run_summarised(args, run, report, _summary, dry_run_done="dry run: nothing sent")


def _options(args: argparse.Namespace, settings: Settings) -> RedriveOptions:
    unknown = sorted(set(args.reason or ()) - set(REASONS))
    if unknown:
        raise UsageError(
            f"--reason {unknown[0]} is not a dead-letter reason: use one of {', '.join(REASONS)}"
        )
    since = parse_time(args.since, option="--since") if args.since else None
    until = parse_time(args.until, option="--until") if args.until else None
    if since is not None and until is not None and until <= since:
        raise UsageError(f"--until {args.until} is not after --since {args.since}")
    if args.max_attempts < 1:
        raise UsageError(f"--max-attempts must be at least 1 (got {args.max_attempts})")
    return RedriveOptions(
        source=settings.topic(DEAD_LETTER),
        target=settings.topic(args.target),
        group=settings.group(GROUP),
        reasons=frozenset(args.reason or REASONS),
        force=args.force,
        since_ms=since,
        until_ms=until,
        dry_run=args.dry_run,
        max_attempts=args.max_attempts,
        deadline_s=parse_age(args.deadline, option="--deadline"),
    )


def report(run: Redrive, outcome: str) -> dict[str, Any]:
    """`redrive --json`: the shape the README documents (keys are only ever added).
    `outcome` is "done" or "interrupted"; counts are per dead-letter reason seen."""
    reasons = {
        reason: {_KEYS[name]: run.counts[(reason, name)] for name in OUTCOMES}
        for reason in sorted({reason for reason, _ in run.counts})
    }
    options = run.options
    return {
        "source": options.source,
        "target": options.target,
        "group": options.group,
        "dry_run": options.dry_run,
        "force": options.force,
        "outcome": outcome,
        "reasons": reasons,
        "total": {_KEYS[name]: run.total(name) for name in OUTCOMES},
        "not_sent": [
            {"partition": partition, "offset": offset, "reason": reason, "why": why}
            for partition, offset, reason, why in run.unsent
        ],
    }


def _summary(run: Redrive, outcome: str) -> str:
    reasons = sorted({reason for reason, _ in run.counts})
    width = max([len("reason"), *map(len, reasons)])
    rows = [f"{'reason':<{width}}  " + "  ".join(f"{name:>16}" for name in OUTCOMES)]
    for reason in [*reasons, "total"]:
        cells = [
            run.total(name) if reason == "total" else run.counts[(reason, name)]
            for name in OUTCOMES
        ]
        rows.append(f"{reason:<{width}}  " + "  ".join(f"{n:>16}" for n in cells))
    for partition, offset, reason, why in run.unsent:
        rows.append(f"not re-driven ({reason}), {why}: partition {partition} offset {offset}")
    rows.append(f"{run.options.source} → {run.options.target}: {outcome}")
    return "\n".join(rows)
