"""`stream replay`'s command line: its options, its summary and its JSON report (the
copying itself is `stream.backfill.replay`)."""

from __future__ import annotations

import argparse
from typing import Any

from stream import topics
from stream.backfill.progress import add_json_option, parse_rate, run_summarised
from stream.backfill.replay import REQUESTS, Replay, ReplayOptions
from stream.backfill.target import merged
from stream.backfill.window import Span, parse_time
from stream.config import Settings
from stream.errors import ConfigError, UsageError

__all__ = ["register", "report", "request_topics"]


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "replay",
        help="copy a time window of requests to the backfill topic (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy the records of SOURCE written in [--since, --until) to TARGET, "
        "partition p to partition p,\nwith a replayed-from header. Run it again with the same "
        "arguments after an interruption:\nit continues where it stopped and never copies a "
        "record twice. A second run\nstarted meanwhile fences this one (Kafka transactions: "
        "it stops, exit 1) and carries on.",
        epilog="examples:\n"
        "  stream replay --since 2h --dry-run\n"
        "  stream replay --since 2025-06-01T00:00:00Z --until 2025-06-01T06:00:00Z --rate 200\n"
        "  stream replay --since 1d --source predictions.requests --to predictions.backfill\n"
        "times: RFC 3339 with a zone (Z or +02:00), `now`, or an age: 30m, 2h, 1d, 1h30m",
    )
    parser.add_argument("--since", required=True, metavar="T", help="start of the window")
    parser.add_argument("--until", metavar="T", help="end of the window (default: now)")
    parser.add_argument(
        "--source",
        default="predictions.requests",
        metavar="TOPIC",
        help="request topic to read (default predictions.requests; STREAM_TOPIC_PREFIX applies)",
    )
    parser.add_argument(
        "--to",
        default="predictions.backfill",
        metavar="TOPIC",
        dest="target",
        help="request topic to write (default predictions.backfill, which runs on spare capacity)",
    )
    parser.add_argument(
        "--rate", metavar="N/s", help="copy at most N records a second (1/60 to 1,000,000)"
    )
    parser.add_argument("--limit", type=int, metavar="N", help="stop after copying N records")
    parser.add_argument("--dry-run", action="store_true", help="count per partition, copy nothing")
    add_json_option(
        parser,
        "{source, target, dry_run, outcome, partitions: [{partition, window_start, window_end, "
        "records, already, to_copy, copied}], total, not_copied: [{partition, offset, why}]}",
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, settings: Settings) -> int:
    run = Replay(settings=settings, options=_options(args, settings))
    return run_summarised(args, run, report, _summary, dry_run_done="dry run: nothing copied")


def _options(args: argparse.Namespace, settings: Settings) -> ReplayOptions:
    since = parse_time(args.since, option="--since")
    until = parse_time(args.until, option="--until") if args.until else None
    if until is not None and until <= since:
        raise UsageError(f"--until {args.until} is not after --since {args.since}")
    if args.source == args.target:
        raise UsageError(
            f"--source and --to are both {args.source}: a topic cannot replay into itself"
        )
    requests = request_topics(settings)
    for option, name in (("--source", args.source), ("--to", args.target)):
        if name not in requests:
            raise ConfigError(
                f"{option} {name} is not a request topic: replay copies requests between "
                f"topics declared with the request schema ({', '.join(requests)})"
            )
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    return ReplayOptions(
        source=settings.topic(args.source),
        target=settings.topic(args.target),
        since_ms=since,
        until_ms=until,
        rate=parse_rate(args.rate),
        limit=args.limit,
        dry_run=args.dry_run,
    )


def request_topics(settings: Settings) -> list[str]:
    """Declared topics (unprefixed) whose records are requests: the contract of
    predictions.requests. Only these may be replayed, and only into each other."""
    specs = topics.load_specs(settings.topics_dir)
    (live,) = [spec for spec in specs if spec.name == REQUESTS]
    return [spec.name for spec in specs if spec.schema_file == live.schema_file]


def report(run: Replay, outcome: str) -> dict[str, Any]:
    """`replay --json`: the shape the README documents (keys are only ever added).
    `outcome` is "done" or "interrupted"; `to_copy` is what was missing when it began."""
    rows = [
        {
            "partition": p.partition,
            "window_start": p.window.start,
            "window_end": p.window.end,
            "records": p.records,
            "already": p.already,
            "to_copy": p.missing,
            "copied": p.copied,
        }
        for p in run.partitions
    ]
    total = {k: sum(row[k] for row in rows) for k in ("records", "already", "to_copy", "copied")}
    return {
        "source": run.options.source,
        "target": run.options.target,
        "dry_run": run.options.dry_run,
        "outcome": outcome,
        "partitions": rows,
        "total": total,
        "not_copied": [
            {"partition": p.partition, "offset": offset, "why": why}
            for p in run.partitions
            for why, offsets in p.uncopied.items()
            for offset in offsets
        ],
    }


def _summary(run: Replay, outcome: str) -> str:
    last = "to copy" if run.options.dry_run else "copied"
    rows = [f"{'partition':>9}  {'window':>19}  {'records':>9}  {'already':>9}  {last:>9}"]
    for p in run.partitions:
        count = p.missing if run.options.dry_run else p.copied
        span = f"{p.window.start}..{p.window.end}"
        rows.append(f"{p.partition:>9}  {span:>19}  {p.records:>9}  {p.already:>9}  {count:>9}")
    window = sum(p.records for p in run.partitions)
    already = sum(p.already for p in run.partitions)
    count = sum(p.missing for p in run.partitions) if run.options.dry_run else run.copied
    rows.append(f"{'total':>9}  {'':>19}  {window:>9}  {already:>9}  {count:>9}")
    not_copied = "will not be copied" if run.options.dry_run else "not copied"
    for p in run.partitions:
        for why, offsets in p.uncopied.items():
            listed = _runs(offsets)
            rows.append(f"{not_copied}, {why}: partition {p.partition} offsets {listed}")
    rows.append(f"{run.options.source} → {run.options.target}: {outcome}")
    return "\n".join(rows)


def _runs(offsets: list[int]) -> str:
    """`offsets` with each run of consecutive ones as first-last: "3-5, 9" (a batch that
    cannot be read lists every record of it)."""
    spans = merged([Span(offset, offset + 1) for offset in offsets])
    return ", ".join(f"{s.start}" if s.size == 1 else f"{s.start}-{s.end - 1}" for s in spans)
