"""`stream redrive`: send dead letters whose request parsed back to be run again, once.

A re-driven request is the dead letter's `request` (orjson) with the original key (or
its request_id), the `request-id` and `traceparent` headers carried through, `attempt`
one higher, and a `redriven-from` header (`topic/partition/offset` of the dead letter).
A request that had a `deadline` gets a fresh one (`--deadline`, 1 h by default): the old
one has passed, or is close to it, and would only dead-letter it again. Reasons that
cannot succeed as sent (bad input, unknown model) are skipped unless `--force`, and so are
requests that already ran `--max-attempts` times (3 by default), so an automated re-drive
cannot loop for ever; each is counted.

Progress lives in the consumer group `predictions-redrive`, committed only after Kafka has
acknowledged the re-driven requests of a batch. A run may pick some reasons only, and a
later one others, so one offset per partition is not enough: the commit metadata holds
the next offset per reason (`{"expired": 120, ...}`); a reason advances only in a run
that acts on it. Every run reads the whole window, so a second run reports what the
first re-drove. Nothing is passed over silently, and nothing is re-driven twice.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.structs import TopicPartition

from stream import records
from stream.backfill.progress import Progress, add_json_option, run_summarised
from stream.backfill.window import Span, batches, parse_age, parse_time, spans
from stream.config import Settings
from stream.engine.fetch import Undecodable
from stream.errors import ConfigError
from stream.kafka import (
    admin_client,
    consumer_client,
    group_offsets,
    producer_client,
    topic_partitions,
    translated,
)

__all__ = ["GROUP", "HOPELESS", "REASONS", "REDRIVEN_FROM", "Redrive", "RedriveOptions", "register"]

REDRIVEN_FROM = records.HEADER_REDRIVEN_FROM
GROUP = "predictions-redrive"
DEAD_LETTER = "predictions.dead-letter"
# the `reason` enum of topics/dead-letter.schema.json (a test keeps the two equal)
REASONS = (
    "invalid_encoding",
    "invalid_json",
    "invalid_request",
    "unknown_model",
    "too_large",
    "expired",
    "no_fallback",
    "fallback_unconfigured",
    "fallback_failed",
    "handler_error",
    "result_too_large",
    "output_rejected",
    "content_filter",
    "context_length_exceeded",
)
# the same bytes would fail the same way: sent again only with --force
HOPELESS = frozenset(
    {
        "invalid_encoding",
        "invalid_json",
        "invalid_request",
        "too_large",
        "unknown_model",
        "result_too_large",
        "output_rejected",
        "content_filter",
        "context_length_exceeded",
    }
)
OUTCOMES = (
    "redriven",
    "already redriven",
    "cannot succeed",
    "no request",
    "max attempts",
    "not selected",
)
# Each outcome's key in the --json summary.
_KEYS = {name: name.replace(" ", "_") for name in OUTCOMES}
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_DEADLINE_S = 3600


@dataclass(frozen=True, kw_only=True)
class RedriveOptions:
    source: str
    target: str
    group: str
    reasons: frozenset[str] = frozenset(REASONS)
    force: bool = False
    since_ms: int | None = None
    until_ms: int | None = None
    dry_run: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    deadline_s: float = DEFAULT_DEADLINE_S  # a re-driven request's deadline: this from now

    @property
    def acting(self) -> frozenset[str]:
        """The reasons this run re-drives (and whose progress it advances)."""
        return self.reasons if self.force else self.reasons - HOPELESS


@dataclass(kw_only=True)
class Redrive:
    """One redrive run: counts per (reason, outcome), and per partition the next offset
    to consider for each reason."""

    settings: Settings
    options: RedriveOptions
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    positions: dict[int, dict[str, int]] = field(default_factory=dict)

    def __repr__(self) -> str:
        redriven = self.total("redriven")
        return f"<Redrive {self.options.source}→{self.options.target} redriven={redriven}>"

    def total(self, outcome: str) -> int:
        return sum(n for (_, kind), n in self.counts.items() if kind == outcome)

    async def run(self) -> None:
        kafka, options = self.settings.kafka, self.options
        found = await topic_partitions(kafka, [options.source, options.target])
        async with consumer_client(
            kafka,
            doing=f"reading {options.source}",
            group_id=options.group,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        ) as consumer:
            try:
                bounds = await self._plan(consumer, found[options.source])
                await self._work(consumer, bounds)
            except AIOKafkaError as exc:
                raise await translated(exc, kafka, f"re-driving {options.source}") from exc

    async def _plan(self, consumer: Any, tps: list[TopicPartition]) -> dict[TopicPartition, Span]:
        window = await spans(consumer, tps, self.options.since_ms, self.options.until_ms)
        committed = await self._committed(tps)
        for tp in tps:
            since = window[tp].start
            known = committed.get(tp.partition, {})
            # --since is a floor: it may skip ahead, never back over what was re-driven
            starts = {r: max(known.get(r, since), since) for r in self.options.acting}
            self.positions[tp.partition] = {**known, **starts}
        # the whole window, not from the positions: what lies below them is counted
        return window

    async def _committed(self, tps: list[TopicPartition]) -> dict[int, dict[str, int]]:
        async with admin_client(self.settings.kafka, doing="reading redrive progress") as admin:
            offsets = await group_offsets(admin, self.options.group, tps)
        return {
            tp.partition: _positions(meta.offset, meta.metadata)
            for tp, meta in offsets.items()
            if meta.offset >= 0
        }

    async def _work(self, consumer: Any, bounds: dict[TopicPartition, Span]) -> None:
        progress = Progress("redrive", sum(span.size for span in bounds.values()))
        async with AsyncExitStack() as stack:
            producer = None
            if not self.options.dry_run:
                doing = f"writing {self.options.target}"
                producer = await stack.enter_async_context(
                    producer_client(self.settings.kafka, doing=doing)
                )
            stream = batches(consumer, bounds, on_undecodable=self._unreadable)
            async with aclosing(stream):
                async for batch in stream:
                    await self._batch(consumer, producer, batch)
                    progress.advance(len(batch))
        progress.finish()

    async def _batch(self, consumer: Any, producer: Any, batch: list[Any]) -> None:
        """Re-drive what is eligible in one batch; commit once Kafka has acknowledged it."""
        pending = []
        for record in batch:
            outgoing = self._decide(record)
            if outgoing is not None and producer is not None:
                key, value, headers = outgoing
                target = self.options.target
                pending.append(await producer.send(target, value, key=key, headers=headers))
        for future in pending:
            await future
        if producer is not None:
            await self._commit(consumer, batch[-1])

    def _decide(self, record: Any) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]] | None:
        """What to send for one dead letter (None: skip it), counted under its reason."""
        letter = _letter(record.value)
        reason = str(letter.get("reason"))
        if reason not in self.options.reasons:
            outcome = "not selected"
        elif reason not in self.options.acting:
            outcome = "cannot succeed"
        elif not isinstance(letter.get("request"), dict):
            outcome = "no request"
        elif _attempt(record) >= self.options.max_attempts:
            outcome = "max attempts"
        elif record.offset < self.positions[record.partition][reason]:
            outcome = "already redriven"
        else:
            outcome = "redriven"
        self.counts[(reason, outcome)] += 1
        if outcome != "redriven":
            return None
        return _outgoing(record, letter, time.time() + self.options.deadline_s)

    def _unreadable(self, bad: Undecodable) -> None:
        """A dead letter the Kafka client cannot decode (someone else wrote it)."""
        self.counts[("unreadable", "no request")] += 1

    async def _commit(self, consumer: Any, last: Any) -> None:
        position = last.offset + 1
        mine = self.positions[last.partition]
        for reason in self.options.acting:
            mine[reason] = max(mine[reason], position)
        tp = TopicPartition(last.topic, last.partition)
        await consumer.commit({tp: (position, orjson.dumps(mine).decode())})


def _positions(offset: int, metadata: str) -> dict[str, int]:
    """Per-reason positions from commit metadata; a plain commit means every reason is there."""
    try:
        found = orjson.loads(metadata) if metadata else None
    except orjson.JSONDecodeError:
        found = None
    if isinstance(found, dict) and all(isinstance(v, int) for v in found.values()):
        return {str(k): v for k, v in found.items()}
    return dict.fromkeys(REASONS, offset)


def _letter(value: bytes | None) -> dict[str, Any]:
    try:
        letter = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return {"reason": "unreadable"}
    return letter if isinstance(letter, dict) else {"reason": "unreadable"}


def _outgoing(
    record: Any, letter: dict[str, Any], deadline: float
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    request: dict[str, Any] = dict(letter["request"])
    if request.get("deadline") is not None:
        request["deadline"] = records.now_rfc3339(deadline)
    request_id = str(letter.get("request_id") or request.get("request_id") or "")
    key = record.key or request_id.encode() or None
    headers = [
        (name, str(_attempt(record) + 1).encode() if name == records.HEADER_ATTEMPT else value)
        for name, value in records.output_headers(record, request_id or None)
    ]
    headers.append((REDRIVEN_FROM, f"{record.topic}/{record.partition}/{record.offset}".encode()))
    return key, orjson.dumps(request), headers


def _attempt(record: Any) -> int:
    """The attempt a dead letter's request ran as (its `attempt` header; 1 without one)."""
    return int(dict(records.output_headers(record, None))[records.HEADER_ATTEMPT])


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "redrive",
        help="send dead letters back to be run again (each once)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Re-publish dead letters whose request parsed to the requests topic, with "
        "attempt + 1 and a\nredriven-from header. Safe to run again: progress is committed per "
        f"reason in the group\n{GROUP} after Kafka acknowledges, so nothing is re-driven twice.\n"
        "Reasons that cannot succeed as sent are skipped unless --force:\n"
        f"{', '.join(sorted(HOPELESS))}.\n"
        "A request that had a deadline gets a fresh one (--deadline); one that already ran\n"
        "--max-attempts times is not sent again.",
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
        + "}}, total}",
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, settings: Settings) -> int:
    run = Redrive(settings=settings, options=_options(args, settings))
    return run_summarised(args, run, report, _summary, dry_run_done="dry run: nothing sent")


def _options(args: argparse.Namespace, settings: Settings) -> RedriveOptions:
    unknown = sorted(set(args.reason or ()) - set(REASONS))
    if unknown:
        raise ConfigError(
            f"--reason {unknown[0]} is not a dead-letter reason: use one of {', '.join(REASONS)}"
        )
    since = parse_time(args.since, option="--since") if args.since else None
    until = parse_time(args.until, option="--until") if args.until else None
    if since is not None and until is not None and until <= since:
        raise ConfigError(f"--until {args.until} is not after --since {args.since}")
    if args.max_attempts < 1:
        raise ConfigError(f"--max-attempts must be at least 1 (got {args.max_attempts})")
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
    rows.append(f"{run.options.source} → {run.options.target}: {outcome}")
    return "\n".join(rows)
