"""`stream replay`: copy a time window of requests to the backfill topic, once.

Each source record keeps its key, value and headers, gains a `replayed-from` header
(`topic/partition/offset`), and goes to the same partition number of the target (modulo
the target's partition count, so keys stay together when the counts differ). The copy
gets the time of copying as its timestamp, not the original one: the backfill topic's
retention (3 days) and its lag in seconds are about when work was queued, and a copy of
a week-old request stamped a week ago would be deleted by retention before it ran.

Resuming needs no state store: the `replayed-from` headers already in the target say
which source offsets were copied. Only target records written since the window began
can be copies of it (a copy is younger than its original), so the scan is bounded.

Offsets are no count: transaction markers and aborted records take offsets too (`stream
redrive` writes the requests topic in transactions). So a run first reads what the target
lacks and counts its records; the totals and the progress line count records, and close.

Copies are written in transactions (one per fetched batch, or about a second's worth
under `--rate`) by a producer whose transactional id is fixed per source and target
(`stream.backfill.writer`): a second run started meanwhile fences this one, and reads
the target only once Kafka has settled this one's last transaction, so the two never
both copy a record. `copied` counts what Kafka committed, also after a Ctrl-C.

A record that cannot be copied (the client cannot decode it, it has neither key nor value,
or with its `replayed-from` header it is larger than the target takes) is listed with why
and passed over; the partition goes on.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import ProducerFenced
from aiokafka.structs import TopicPartition

from stream import records
from stream.backfill.progress import (
    STALL_S,
    Pacer,
    Progress,
)
from stream.backfill.target import contains, copies, limit, oversize, refusal
from stream.backfill.window import Span, batches, spans
from stream.backfill.writer import (
    Refused,
    Transaction,
    taken_over,
    transaction,
    writer,
)
from stream.config import Settings
from stream.engine.fetch import Undecodable
from stream.kafka import admin_client, consumer_client, topic_partitions, translated

__all__ = ["REPLAYED_FROM", "REQUESTS", "PartitionReplay", "Replay", "ReplayOptions"]

REPLAYED_FROM = records.HEADER_REPLAYED_FROM
REQUESTS = "predictions.requests"
TRANSACTIONAL_ID = "predictions-replay"  # then .SOURCE.TARGET
_UNDECODABLE = "the Kafka client cannot decode them"
_EMPTY = "neither key nor value (the Kafka client cannot write that)"


@dataclass(frozen=True, kw_only=True)
class ReplayOptions:
    source: str
    target: str
    since_ms: int
    until_ms: int | None = None
    rate: float | None = None
    limit: int | None = None
    dry_run: bool = False


@dataclass(kw_only=True)
class PartitionReplay:
    """One source partition: its window, what the target already holds of it, what we did."""

    partition: int
    window: Span
    done: list[Span]  # source offsets already copied (merged, sorted)
    missing: int = 0  # records in the window not in the target (counted by reading them)
    first: int | None = None  # the first of them, once counted
    copied: int = 0
    # offsets that cannot be copied, by why: the client cannot decode them, or cannot write
    # them (neither key nor value), or the target cannot take them (too large)
    uncopied: dict[str, list[int]] = field(default_factory=dict)

    @property
    def records(self) -> int:  # the window's offsets less markers and aborted records
        return self.already + self.missing

    @property
    def already(self) -> int:
        return sum(
            max(0, min(s.end, self.window.end) - max(s.start, self.window.start)) for s in self.done
        )

    def first_missing(self) -> int:
        """Where copying starts: the first window offset not in a copied range."""
        at = self.window.start
        for span in self.done:
            if span.start <= at < span.end:
                at = span.end
        return min(at, self.window.end)

    def copied_before(self, offset: int) -> bool:
        return contains(self.done, offset)

    def lacks(self, offset: int) -> None:  # the record at `offset` is not in the target
        self.missing += 1
        self.first = offset if self.first is None else self.first

    def skip(self, offset: int, why: str) -> None:
        self.uncopied.setdefault(why, []).append(offset)

    def count(self, copied: int) -> None:
        self.copied += copied


@dataclass(kw_only=True)
class Replay:
    """One replay run; its counters stay readable after an interruption."""

    settings: Settings
    options: ReplayOptions
    partitions: list[PartitionReplay] = field(default_factory=list)
    target_partitions: int = 0
    max_bytes: int = 0  # the largest record the target takes
    # While copying without --limit (which counts copies): records listed as not copied
    # count in it too, as in its total, so that a finished run is at 100 %.
    _progress: Progress | None = field(default=None, init=False, repr=False)

    def __repr__(self) -> str:
        return (
            f"<Replay {self.options.source}→{self.options.target} copied={self.copied} "
            f"already={sum(p.already for p in self.partitions)}>"
        )

    @property
    def copied(self) -> int:
        return sum(p.copied for p in self.partitions)

    def begun(self) -> bool:
        return bool(self.partitions)

    @property
    def transactional_id(self) -> str:
        """One per source and target: the runs that could copy the same records (under
        the prefix, like the groups, so that one prefixed ACL covers both)."""
        prefix = self.settings.topic_prefix
        source, target = (
            t.removeprefix(prefix) for t in (self.options.source, self.options.target)
        )
        return f"{self.settings.group(TRANSACTIONAL_ID)}.{source}.{target}"

    async def run(self) -> None:
        options = self.options
        kafka = self.settings.kafka
        async with consumer_client(
            kafka,
            doing=f"reading {options.source}",
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        ) as consumer:
            try:
                # the producer first: the target is read once no other run can write it
                async with writer(self.settings, self.transactional_id, options) as producer:
                    await self._plan(consumer)
                    if producer is not None:
                        await self._copy(consumer, producer)
            except ProducerFenced as exc:
                raise taken_over("replay", self.transactional_id, options.target, exc) from exc
            except AIOKafkaError as exc:
                raise await translated(exc, kafka, f"replaying {options.source}") from exc

    async def _plan(self, consumer: Any) -> None:
        source, target = self.options.source, self.options.target
        found = await topic_partitions(self.settings.kafka, [source, target])
        sources, targets = found[source], found[target]
        self.target_partitions = len(targets)
        async with admin_client(self.settings.kafka, doing=f"describing {target}") as admin:
            self.max_bytes = await limit(admin, self.settings, target)
        window = await spans(consumer, sources, self.options.since_ms, self.options.until_ms)
        done = await copies(consumer, targets, REPLAYED_FROM, source, self.options.since_ms)
        self.partitions = [
            PartitionReplay(
                partition=tp.partition, window=window[tp], done=done.get(tp.partition, [])
            )
            for tp in sources
        ]
        await self._count(consumer)

    async def _count(self, consumer: Any) -> None:
        """Count the records the target lacks, reading from each partition's first offset
        not copied: everything before it is copied, and the gaps after it may be markers."""
        todo = {
            TopicPartition(self.options.source, p.partition): Span(p.first_missing(), p.window.end)
            for p in self.partitions
        }
        stream = batches(consumer, todo, on_undecodable=self._uncounted)
        read = {tp.partition: span.start for tp, span in todo.items()}
        offsets = sum(span.end - span.start for span in todo.values())
        # A window of millions takes minutes to read: progress (past 5 s) and stall notices
        # on stderr, as the copy has; no closing line (a small one shows nothing).
        with Progress("replay, counting what is missing", offsets, unit="offsets") as progress:
            async with aclosing(stream):
                async for batch in stream:
                    part = self._partition(batch[0].partition)
                    for record in batch:
                        if not part.copied_before(record.offset):
                            part.lacks(record.offset)
                    progress.advance(batch[-1].offset + 1 - read[part.partition])
                    read[part.partition] = batch[-1].offset + 1

    def _uncounted(self, bad: Undecodable) -> None:  # a record all the same: to be listed
        part = self._partition(bad.tp.partition)
        part.lacks(bad.offset)
        if self.options.dry_run:  # known now: the run itself lists it when it gets there
            part.skip(bad.offset, _UNDECODABLE)

    async def _copy(self, consumer: Any, producer: Any) -> None:
        # only where records are missing, from the first of them
        todo = {
            TopicPartition(self.options.source, p.partition): Span(p.first, p.window.end)
            for p in self.partitions
            if p.first is not None
        }
        total = sum(p.missing for p in self.partitions)
        rate = self.options.rate
        # a slow --rate leaves seconds between records by design: not a stall
        stall_s = max(STALL_S, 3 / rate) if rate else STALL_S
        pacer = Pacer(rate)
        stream = batches(consumer, todo, on_undecodable=self._unreadable)
        planned = min(total, self.options.limit or total)
        with Progress("replay", planned, stall_s=stall_s) as progress:
            self._progress = None if self.options.limit is not None else progress
            async with aclosing(stream):
                async for batch in stream:
                    if not await self._send(producer, batch, pacer, progress):
                        break
            progress.finish()

    def _listed(self, count: int) -> None:  # records listed as not copied: dealt with
        if self._progress is not None and count:
            self._progress.advance(count)

    def _unreadable(self, bad: Undecodable) -> None:
        """A source record the Kafka client cannot decode: it cannot be copied; say so."""
        self._partition(bad.tp.partition).skip(bad.offset, _UNDECODABLE)
        self._listed(1)

    def _partition(self, number: int) -> PartitionReplay:
        return next(p for p in self.partitions if p.partition == number)

    async def _send(
        self, producer: Any, batch: list[Any], pacer: Pacer, progress: Progress
    ) -> bool:
        """Copy one fetched batch and wait for Kafka to answer each copy; False at the limit."""
        part = self._partition(batch[0].partition)
        lacking = [record for record in batch if not part.copied_before(record.offset)]
        fresh = [record for record in lacking if self._writable(part, record)]
        self._listed(len(lacking) - len(fresh))
        if self.options.limit is not None:
            fresh = fresh[: self.options.limit - self.copied]
        # paced, a transaction holds about a second of copies: readers of the target
        # wait for a transaction's end, not for the whole batch
        step = max(1, int(self.options.rate or len(fresh)))
        for at in range(0, len(fresh), step):
            chunk = fresh[at : at + step]
            await self._commit(producer, part, chunk, pacer)
            progress.advance(len(chunk))
        return self.options.limit is None or self.copied < self.options.limit

    async def _commit(
        self, producer: Any, part: PartitionReplay, chunk: list[Any], pacer: Pacer
    ) -> None:
        """Copy `chunk` in one transaction, counted once Kafka has committed it. A record
        Kafka refuses for its size aborts the transaction: it is listed, the rest go again."""
        while chunk:
            refused: dict[int, str] = {}
            try:
                done = partial(part.count, len(chunk))
                async with transaction(producer, on_commit=done) as txn:
                    sent = []
                    for record in chunk:
                        await pacer.wait()
                        sent.append(await self._write(txn, record))
                    for record, answer in zip(chunk, sent, strict=True):
                        if (why := await refusal(answer)) is not None:
                            refused[record.offset] = why
                    if refused:
                        raise Refused
            except Refused:
                for offset, why in refused.items():
                    part.skip(offset, why)
                chunk = [record for record in chunk if record.offset not in refused]
                continue
            return

    def _writable(self, part: PartitionReplay, record: Any) -> bool:
        """Whether `record` can be copied; if not, it is listed with why."""
        if record.key is None and record.value is None:  # aiokafka will not send it
            part.skip(record.offset, _EMPTY)
            return False
        why = oversize(record.key, record.value, _headers(record), self.max_bytes)
        if why is not None:
            part.skip(record.offset, why)
        return why is None

    async def _write(self, txn: Transaction, record: Any) -> Any:
        return await txn.send(
            self.options.target,
            record.value,
            key=record.key,
            partition=record.partition % self.target_partitions,
            headers=_headers(record),
        )


def _headers(record: Any) -> list[tuple[str, bytes]]:
    # a replay of a replay names its immediate source only: that is what resuming reads
    kept = [(key, value) for key, value in record.headers if key != REPLAYED_FROM]
    origin = f"{record.topic}/{record.partition}/{record.offset}".encode()
    return [*kept, (REPLAYED_FROM, origin)]
