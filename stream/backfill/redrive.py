"""`stream redrive`: send dead letters whose request parsed back to be run again, once.

A re-driven request is the dead letter's `request` (orjson) with the original key (or
its request_id), the `request-id` and `traceparent` headers carried through, `attempt`
one higher, and a `redriven-from` header (`topic/partition/offset` of the dead letter).
A request that had a `deadline` gets a fresh one (`--deadline`, 1 h by default): the old
one has passed, or is close to it, and would only dead-letter it again. Reasons that
cannot succeed as sent (bad input, unknown model) are skipped unless `--force`, as are
those that ran `--max-attempts` times (3 by default): a re-drive cannot loop for ever.

Progress lives in the consumer group `predictions-redrive`, committed in one Kafka
transaction with the re-driven requests of a batch: both land, or neither does. A run
may pick some reasons only, and a later one others, so one offset per partition is not
enough: the commit metadata holds the next offset per reason (`{"expired": 120, ...}`);
a reason advances only in a run that acts on it. Every run reads the whole window, so a
second run reports what the first re-drove. Nothing is passed over silently, nor re-driven twice.

A letter whose request cannot be sent as it came (not writable as JSON, an integer beyond
64 bits, larger than the target takes) is counted as "cannot send", listed, passed over.

The transactions' producer has a fixed id per group (`stream.backfill.writer`): a second
run started meanwhile fences this one and reads the group's progress only once Kafka has
settled this one's last transaction, so two runs never both re-drive a letter.
Runs before transactions marked a batch in the commit before sending it (`"@sending":
{"at": ms, "to": topic}`), cleared after the acks; a run that finds one (its predecessor
died between) counts the `redriven-from` headers since in the target as already re-driven.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import ProducerFenced
from aiokafka.structs import TopicPartition

from stream import records
from stream.backfill.progress import Progress
from stream.backfill.target import contains, copies, limit, merged, oversize, refusal
from stream.backfill.window import Span, batches, spans
from stream.backfill.writer import (
    Refused,
    Transaction,
    taken_over,
    transaction,
    writer,
)
from stream.checks import is_topic_name
from stream.config import Settings
from stream.engine.fetch import Undecodable
from stream.errors import ConfigError, InvalidRecordError
from stream.kafka import (
    admin_client,
    consumer_client,
    group_offsets,
    topic_partitions,
    translated,
)

__all__ = [
    "DEAD_LETTER",
    "GROUP",
    "HOPELESS",
    "OUTCOMES",
    "REASONS",
    "REDRIVEN_FROM",
    "Redrive",
    "RedriveOptions",
]

log = logging.getLogger(__name__)

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
UNREADABLE, UNKNOWN_REASON = "unreadable", "unknown"  # not a JSON object; another reason
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
    "cannot send",
)
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_DEADLINE_S = 3600
# In commit metadata of runs before transactions: a batch was being sent (when, to where)
# and not yet acknowledged.
SENDING = "@sending"
Outgoing = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


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
    # letters not sent though eligible: (partition, offset, reason, why)
    unsent: list[tuple[int, int, str, str]] = field(default_factory=list)
    # per partition, offsets found in the target after a run died before committing them
    found: dict[int, list[Span]] = field(default_factory=dict)
    max_bytes: int = 0  # the largest record the target takes

    def __repr__(self) -> str:
        redriven = self.total("redriven")
        return f"<Redrive {self.options.source}→{self.options.target} redriven={redriven}>"

    def begun(self) -> bool:
        return bool(self.positions)

    def total(self, outcome: str) -> int:
        return sum(n for (_, kind), n in self.counts.items() if kind == outcome)

    @property
    def transactional_id(self) -> str:
        """One per progress group: runs sharing it could re-drive the same letters."""
        return self.options.group

    async def run(self) -> None:
        kafka, options = self.settings.kafka, self.options
        found = await topic_partitions(kafka, [options.source, options.target])
        async with consumer_client(
            kafka,
            doing=f"reading {options.source}",
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        ) as consumer:
            try:
                # the producer first: progress is read once no other run can commit any
                async with writer(self.settings, self.transactional_id, options) as producer:
                    bounds = await self._plan(consumer, found[options.source])
                    await self._work(consumer, producer, bounds)
            except ProducerFenced as exc:
                raise taken_over("redrive", self.transactional_id, options.target, exc) from exc
            except AIOKafkaError as exc:
                raise await translated(exc, kafka, f"re-driving {options.source}") from exc

    async def _plan(self, consumer: Any, tps: list[TopicPartition]) -> dict[TopicPartition, Span]:
        window = await spans(consumer, tps, self.options.since_ms, self.options.until_ms)
        committed, marks = await self._committed(tps)
        await self._recover(marks)
        for tp in tps:
            since = window[tp].start
            known = committed.get(tp.partition, {})
            # --since is a floor: it may skip ahead, never back over what was re-driven
            starts = {r: max(known.get(r, since), since) for r in self.options.acting}
            self.positions[tp.partition] = {**known, **starts}
        # the whole window, not from the positions: what lies below them is counted
        return window

    async def _committed(
        self, tps: list[TopicPartition]
    ) -> tuple[dict[int, dict[str, int]], dict[str, int]]:
        """Positions per partition, and the marks of sends never acknowledged (target →
        the earliest time); also the largest record the target takes."""
        async with admin_client(self.settings.kafka, doing="reading redrive progress") as admin:
            offsets = await group_offsets(admin, self.options.group, tps)
            self.max_bytes = await limit(admin, self.settings, self.options.target)
        positions: dict[int, dict[str, int]] = {}
        marks: dict[str, int] = {}
        for tp, meta in offsets.items():
            if meta.offset >= 0:
                positions[tp.partition] = _positions(meta.offset, meta.metadata)
                mark = _mark(meta.metadata)
                if mark is not None:
                    marks[mark[1]] = min(mark[0], marks.get(mark[1], mark[0]))
        return positions, marks

    async def _recover(self, marks: dict[str, int]) -> None:
        """What a run that died mid-batch sent: the targets' records that name a letter.
        Read by a consumer of its own: the group's must keep one assignment (aiokafka's
        coordinator fails on a second)."""
        found: dict[int, list[Span]] = {}
        kafka = self.settings.kafka
        for target, since in marks.items():
            try:
                (tps,) = (await topic_partitions(kafka, [target])).values()
            except ConfigError:  # nothing was written to a topic that is not there
                log.warning("a past run's mark names topic %s, which does not exist", target)
                continue
            async with consumer_client(
                kafka, doing=f"reading {target}", isolation_level="read_committed"
            ) as consumer:
                copied = await copies(consumer, tps, REDRIVEN_FROM, self.options.source, since)
            for partition, ranges in copied.items():
                found.setdefault(partition, []).extend(ranges)
        self.found = {partition: merged(ranges) for partition, ranges in found.items()}

    async def _work(self, consumer: Any, producer: Any, bounds: dict[TopicPartition, Span]) -> None:
        stream = batches(consumer, bounds, on_undecodable=self._unreadable)
        # Progress in offsets, as the total is: dead letters written in transactions (an
        # exactly-once worker's) have a marker after each one, which no batch holds:
        # counted by records, a finished run said it was half done (a letter per
        # transaction).
        reached = {tp: span.start for tp, span in bounds.items()}
        total = sum(span.size for span in bounds.values())
        with Progress("redrive", total, unit="offsets") as progress:
            async with aclosing(stream):
                async for batch in stream:
                    await self._batch(producer, batch)
                    last = batch[-1]
                    tp = TopicPartition(last.topic, last.partition)
                    progress.advance(last.offset + 1 - reached[tp])
                    reached[tp] = last.offset + 1
            # The stream ends once every partition's position passed its span's end: the
            # offsets after each one's last record (markers) are behind it too.
            progress.advance(progress.total - progress.done)
            progress.finish()

    async def _batch(self, producer: Any, batch: list[Any]) -> None:
        """Re-drive what is eligible in one batch, in one transaction with the progress
        past it; counted once Kafka has committed it. A request Kafka refuses for its
        size aborts the transaction: it is listed, the rest go again."""
        ready = [(record, *chosen) for record in batch if (chosen := self._decide(record))]
        if producer is None:  # a dry run: what would be sent
            for _, reason, _ in ready:
                self.counts[(reason, "redriven")] += 1
            return
        tp = TopicPartition(batch[-1].topic, batch[-1].partition)
        position = batch[-1].offset + 1
        mine = self.positions[tp.partition]
        moved = {**mine, **{r: max(mine[r], position) for r in self.options.acting}}
        while True:
            refused: dict[int, str] = {}
            done = partial(self._done, tp.partition, moved, ready)
            try:
                async with transaction(producer, on_commit=done) as txn:
                    refused = await self._send(txn, ready)
                    if refused:
                        raise Refused
                    metadata = orjson.dumps(moved).decode()
                    offsets = {tp: (position, metadata)}
                    await producer.send_offsets_to_transaction(offsets, self.options.group)
            except Refused:
                for record, reason, _ in ready:
                    if record.offset in refused:
                        self._unsent(record, reason, refused[record.offset])
                ready = [item for item in ready if item[0].offset not in refused]
                continue
            return

    async def _send(
        self, txn: Transaction, ready: list[tuple[Any, str, Outgoing]]
    ) -> dict[int, str]:
        """Send each re-driven request and wait for Kafka's answers: what it refused, why."""
        target = self.options.target
        answers = [
            await txn.send(target, value, key=key, headers=headers)
            for _, _, (key, value, headers) in ready
        ]
        refused = {}
        for (record, _, _), answer in zip(ready, answers, strict=True):
            if (why := await refusal(answer)) is not None:
                refused[record.offset] = why
        return refused

    def _done(
        self, partition: int, moved: dict[str, int], sent: list[tuple[Any, str, Outgoing]]
    ) -> None:
        """A batch's transaction committed: its progress and its re-driven requests."""
        self.positions[partition] = moved
        for _, reason, _ in sent:
            self.counts[(reason, "redriven")] += 1

    def _decide(self, record: Any) -> tuple[str, Outgoing] | None:
        """The reason and what to send for one dead letter; None (counted) to skip it."""
        letter = _letter(record.value)
        reason = _reason(letter)
        outcome = _passed_over(record, letter, reason, self.options)
        if outcome is not None:
            self.counts[(reason, outcome)] += 1
            return None
        # before the position: a letter that cannot be sent is said so on every run
        outgoing = self._prepare(record, letter)
        if isinstance(outgoing, str):
            self._unsent(record, reason, outgoing)
            return None
        if record.offset < self.positions[record.partition][reason] or contains(
            self.found.get(record.partition, []), record.offset
        ):
            self.counts[(reason, "already redriven")] += 1
            return None
        return reason, outgoing

    def _prepare(self, record: Any, letter: dict[str, Any]) -> Outgoing | str:
        """What to send for a letter, or why it cannot be sent."""
        try:
            records.check_exact(record.value or b"")  # orjson read a long integer as a float
        except InvalidRecordError:
            return "it holds an integer beyond 64 bits, which would be sent as a float"
        try:
            key, value, headers = _outgoing(record, letter, time.time() + self.options.deadline_s)
        except orjson.JSONEncodeError as exc:  # orjson writes 254 levels, reads 1024
            return f"its request cannot be written as JSON ({exc})"
        return oversize(key, value, headers, self.max_bytes) or (key, value, headers)

    def _unsent(self, record: Any, reason: str, why: str) -> None:
        self.counts[(reason, "cannot send")] += 1
        self.unsent.append((record.partition, record.offset, reason, why))

    def _unreadable(self, bad: Undecodable) -> None:
        """A dead letter the Kafka client cannot decode (someone else wrote it)."""
        self.counts[(UNREADABLE, "no request")] += 1


def _passed_over(
    record: Any, letter: dict[str, Any], reason: str, options: RedriveOptions
) -> str | None:
    """Why a dead letter is not re-driven on its own account (None: it is eligible)."""
    if reason == UNREADABLE:
        return "no request"
    if reason not in options.reasons:
        return "not selected"
    if reason not in options.acting:
        return "cannot succeed"
    if not isinstance(letter.get("request"), dict):
        return "no request"
    if _attempt(record) >= options.max_attempts:
        return "max attempts"
    return None


def _positions(offset: int, metadata: str) -> dict[str, int]:
    """Per-reason positions from commit metadata; a plain commit means every reason is there."""
    found = _metadata(metadata)
    positions = {k: v for k, v in found.items() if k != SENDING}
    if found and all(isinstance(v, int) for v in positions.values()):
        return positions
    return dict.fromkeys(REASONS, offset)


def _mark(metadata: str) -> tuple[int, str] | None:
    """(when, to which topic) a batch was being sent, if the commit says one was: a time
    Kafka can look up and a topic name it takes (the group's metadata is any committer's
    to write)."""
    mark = _metadata(metadata).get(SENDING)
    if not isinstance(mark, dict):
        return None
    at, to = mark.get("at"), mark.get("to")
    if isinstance(at, int) and 0 <= at < 2**63 and isinstance(to, str) and is_topic_name(to):
        return at, to
    return None


def _metadata(metadata: str) -> dict[str, Any]:
    try:
        found = orjson.loads(metadata) if metadata else None
    except orjson.JSONDecodeError:
        found = None
    return found if isinstance(found, dict) else {}


def _letter(value: bytes | None) -> dict[str, Any]:
    try:
        letter = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return {"reason": UNREADABLE}
    return letter if isinstance(letter, dict) else {"reason": UNREADABLE}


def _reason(letter: dict[str, Any]) -> str:
    """One of `REASONS`, or what stands for the rest: a dead-letter topic is anyone's to
    write, and a reason of escape codes cleared the operator's screen (a row per value)."""
    reason = letter.get("reason")
    if isinstance(reason, str) and (reason in REASONS or reason == UNREADABLE):
        return reason
    return UNKNOWN_REASON


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
