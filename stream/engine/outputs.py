"""Where a stage's outputs go, and how finished offsets are committed with them.

Two sinks, one per delivery guarantee:

- `AtLeastOnceSink`: one idempotent producer (`acks=all`). A record counts as finished
  only once Kafka acknowledged every one of its outputs; offsets are committed by the
  consumer. A crash re-runs what was not committed, so an output may appear twice.
- `ExactlyOnceSink`: one transactional producer per input partition, its
  `transactional_id` derived from group, topic and partition, so whoever owns the
  partition next fences the previous owner (aiokafka has no group-generation fencing).
  Outputs and the partition's offsets (watermark + metadata) commit in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import (
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordTooLargeError,
)

from stream.config import KafkaSettings
from stream.engine.partitions import Partition
from stream.errors import OutputRejectedError
from stream.kafka import translate

__all__ = ["MAX_OUTPUT_BYTES", "AtLeastOnceSink", "ExactlyOnceSink", "Output", "Sink"]

log = logging.getLogger(__name__)

# The largest record the engine writes: topics/dead-letter.toml's max.message.bytes.
MAX_OUTPUT_BYTES = 2 * 1024 * 1024
_BACKOFF_MAX_S = 5.0
_TOO_LARGE_TRIES = 3
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
_CLOSE_TIMEOUT_S = 10.0
# An ack normally takes milliseconds; the idempotent producer retries a refused batch (no
# leader, fewer in-sync replicas than min.insync.replicas) for ever without telling us, so
# a wait this long is how the sink learns Kafka is not taking its outputs.
_BLOCKED_AFTER_S = 5.0
# aiokafka's default, named: past it the broker aborts an open transaction anyway.
_TRANSACTION_TIMEOUT_MS = 60_000


@dataclass(frozen=True, slots=True)
class Output:
    """One record a handler wants written."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


class Sink(Protocol):
    # Wall-clock time since which Kafka has taken none of the outputs (None: they flow),
    # and why, for the engine's snapshot, metrics and readiness.
    blocked_since: float | None
    blocked_why: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def assigned(self, tps: Iterable[TopicPartition]) -> None: ...
    async def revoked(self, tps: Iterable[TopicPartition]) -> None: ...
    async def write(self, partition: Partition, offset: int, outputs: Sequence[Output]) -> bool:
        """Write the outputs of the record at `offset`, then mark it finished; False when
        the partition left first (the record stays unfinished, for its next owner)."""

    async def commit(self, partitions: Sequence[Partition]) -> int:
        """Commit the partitions' watermarks; return how many changed."""


def _changes(partitions: Iterable[Partition]) -> dict[Partition, tuple[int, str]]:
    changed = {}
    for partition in partitions:
        offsets = partition.offsets
        if offsets.watermark < 0:
            continue  # nothing fetched yet on a partition without a committed offset
        position = (offsets.watermark, offsets.metadata())
        if position != partition.committed:
            changed[partition] = position
    return changed


async def _send(producer: AIOKafkaProducer, outputs: Sequence[Output]) -> list[Any]:
    """Hand the outputs to the producer; the futures resolve when Kafka acknowledges."""
    return [
        await producer.send(o.topic, o.value, key=o.key, headers=list(o.headers)) for o in outputs
    ]


class _Reporting:
    """Whether Kafka takes the sink's outputs: `blocked_since` (wall clock) and why, set
    when an acknowledgement is late or a write fails, cleared by the next one that lands."""

    blocked_since: float | None = None
    blocked_why = ""
    blocked_after_s = _BLOCKED_AFTER_S

    async def _acknowledged(self, future: Any) -> None:
        """Wait for Kafka's ack of one output; past `blocked_after_s` the sink reports
        itself blocked. The producer goes on retrying that same batch: sending it again
        here would write it twice."""
        if not future.done():
            began = time.time()
            done, _ = await asyncio.wait([future], timeout=self.blocked_after_s)
            if not done:
                self._blocked(began, f"no acknowledgement in {self.blocked_after_s:g} s")
        await future

    def _blocked(self, since: float, why: str) -> None:
        self.blocked_why = why
        if self.blocked_since is None:
            self.blocked_since = since
            log.error(
                "Kafka is not taking outputs (%s): their records stay unfinished and "
                "uncommitted, and are written when it takes them again",
                why,
            )

    def _flowing(self) -> None:
        if self.blocked_since is not None:
            log.warning("Kafka takes outputs again, after %.0f s", time.time() - self.blocked_since)
            self.blocked_since = None


class AtLeastOnceSink(_Reporting):
    def __init__(
        self, settings: KafkaSettings, consumer: AIOKafkaConsumer, producer_options: dict[str, Any]
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self._options = producer_options
        self._producer = self._new_producer()
        self._renewing = anyio.Lock()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self._settings.client_options(),
            enable_idempotence=True,
            acks="all",
            **self._options,
        )

    async def _renew(self, failed: AIOKafkaProducer, why: str) -> None:
        """A new producer (a new idempotence id) in place of `failed`. After the broker
        refuses a batch, aiokafka's sequence numbers for its partition no longer match the
        broker's, and every later batch there fails (OutOfOrderSequenceNumber)."""
        async with self._renewing:
            if self._producer is not failed:
                return  # another writer renewed it already
            log.warning("renewing the output producer after %s", why)
            fresh = self._new_producer()
            try:
                await fresh.start()
            except (AIOKafkaError, OSError):
                await fresh.stop()
                return  # Kafka is away: the writers' retries try again
            self._producer = fresh
        with anyio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
            await failed.stop()  # its pending sends fail, and their writers retry

    async def start(self) -> None:
        try:
            await self._producer.start()
        except (AIOKafkaError, OSError) as exc:
            await self._producer.stop()
            raise translate(exc, self._settings, "starting the producer") from exc

    async def stop(self) -> None:
        with anyio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
            await self._producer.stop()

    async def assigned(self, tps: Iterable[TopicPartition]) -> None:
        pass  # one producer serves every partition

    async def revoked(self, tps: Iterable[TopicPartition]) -> None:
        pass

    async def write(self, partition: Partition, offset: int, outputs: Sequence[Output]) -> bool:
        attempt = too_large = 0
        while True:
            producer = self._producer
            try:
                for future in await _send(producer, outputs):
                    await self._acknowledged(future)
                self._flowing()
                break
            except AIOKafkaError as exc:
                # Kafka is down or slow: keep the record unfinished and try again, so its
                # offset is never committed without its outputs.
                self._blocked(time.time(), type(exc).__name__)
                if isinstance(exc, (*_TOO_LARGE, OutOfOrderSequenceNumber)):
                    await self._renew(producer, type(exc).__name__)
                if isinstance(exc, _TOO_LARGE):
                    # The broker judges whole batches: a small output fails with the big one
                    # it was batched with, so it gets tries of its own. Past those, the same
                    # bytes fail the same way, and retrying would stall the partition.
                    too_large += 1
                    if too_large >= _TOO_LARGE_TRIES:
                        raise OutputRejectedError(
                            f"Kafka refused an output of {partition.tp} offset {offset} for "
                            f"good ({type(exc).__name__}): larger than its topic's "
                            "max.message.bytes"
                        ) from exc
                attempt += 1
                delay = min(_BACKOFF_MAX_S, 0.1 * 2**attempt) * random.uniform(0.5, 1.0)
                log.warning(
                    "producing outputs of %s offset %d failed (%s), retry %d in %.1f s",
                    partition.tp,
                    offset,
                    type(exc).__name__,
                    attempt,
                    delay,
                )
                await anyio.sleep(delay)
        partition.offsets.finish(offset)
        return True

    async def commit(self, partitions: Sequence[Partition]) -> int:
        changed = _changes(partitions)
        if not changed:
            return 0
        offsets = {partition.tp: position for partition, position in changed.items()}
        try:
            with anyio.fail_after(self._settings.request_timeout_ms / 1000):
                await self._consumer.commit(offsets)
        except (AIOKafkaError, TimeoutError) as exc:
            raise translate(exc, self._settings, "committing offsets") from exc
        for partition, position in changed.items():
            partition.committed = position
        return len(changed)


class _Transactional:
    """The producer of one input partition, and whether its transaction is open."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.lock = anyio.Lock()
        self.open = False
        # Delivery futures of the open transaction: a batch the broker rejects for good
        # (too large, not authorised) fails only its future, and the transaction would
        # still commit the offsets of records whose outputs never landed.
        self.pending: list[Any] = []

    async def begin(self) -> None:
        if not self.open:
            await self.producer.begin_transaction()
            self.open = True


class ExactlyOnceSink(_Reporting):
    def __init__(
        self, settings: KafkaSettings, group_id: str, producer_options: dict[str, Any]
    ) -> None:
        self._settings = settings
        self._group_id = group_id
        self._options = producer_options
        self._producers: dict[TopicPartition, _Transactional] = {}

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self._group_id}.{tp.topic}.{tp.partition}"

    async def start(self) -> None:
        pass  # producers come with partitions

    async def stop(self) -> None:
        await self.revoked(list(self._producers))

    async def assigned(self, tps: Iterable[TopicPartition]) -> None:
        """Start (and so fence any previous owner of) each partition's producer."""
        async with anyio.create_task_group() as group:
            for tp in tps:
                if tp not in self._producers:
                    group.start_soon(self._start_producer, tp)

    async def _start_producer(self, tp: TopicPartition) -> None:
        producer = AIOKafkaProducer(
            **self._settings.client_options(),
            transactional_id=self.transactional_id(tp),
            transaction_timeout_ms=_TRANSACTION_TIMEOUT_MS,
            **self._options,
        )
        started = time.monotonic()
        try:
            # init_transactions: bumps the epoch, aborts the old owner's open transaction
            await producer.start()
        except (AIOKafkaError, OSError) as exc:
            await producer.stop()
            raise translate(exc, self._settings, f"starting the producer for {tp}") from exc
        log.debug("transactional producer for %s ready in %.3f s", tp, time.monotonic() - started)
        self._producers[tp] = _Transactional(producer)

    async def revoked(self, tps: Iterable[TopicPartition]) -> None:
        leaving = [txn for tp in list(tps) if (txn := self._producers.pop(tp, None)) is not None]
        # All at once: a revoke must end within the rebalance timeout, however many leave.
        with anyio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
            async with anyio.create_task_group() as group:
                for txn in leaving:
                    # an open transaction is aborted by the broker
                    group.start_soon(txn.producer.stop)

    async def write(self, partition: Partition, offset: int, outputs: Sequence[Output]) -> bool:
        txn = self._producers.get(partition.tp)
        if txn is None:
            return False  # the partition left (its transaction is settled): re-run later
        # Shielded: the outputs and the "finished" mark go into the transaction together,
        # or neither does (an abandoned record must not leave orphan outputs behind).
        finished = False
        with anyio.CancelScope(shield=True):
            async with txn.lock:
                # The partition may have left while this waited for the lock, even come back
                # with a new producer that must not take this run's outputs.
                if not partition.abandoned and self._producers.get(partition.tp) is txn:
                    try:
                        await txn.begin()
                        txn.pending += await _send(txn.producer, outputs)
                    except AIOKafkaError as exc:
                        raise translate(exc, self._settings, "producing outputs") from exc
                    partition.offsets.finish(offset)
                    finished = True
        return finished

    async def commit(self, partitions: Sequence[Partition]) -> int:
        changed = _changes(partitions)
        todo = [p for p in partitions if p in changed or self._is_open(p)]
        if not todo:
            return 0
        async with anyio.create_task_group() as watch:
            watch.start_soon(self._report_late, time.time())
            async with anyio.create_task_group() as group:
                for partition in todo:
                    group.start_soon(self._commit_one, partition)
            watch.cancel_scope.cancel()
        return len(todo)

    async def _report_late(self, began: float) -> None:
        # A transaction waits as long as Kafka cannot log it (too few in-sync replicas of
        # the transaction log or of an output topic), offsets-only ones too.
        await anyio.sleep(self.blocked_after_s)
        self._blocked(began, f"transactions not committed in {self.blocked_after_s:g} s")

    def _is_open(self, partition: Partition) -> bool:
        txn = self._producers.get(partition.tp)
        return txn is not None and txn.open

    async def _commit_one(self, partition: Partition) -> None:
        txn = self._producers.get(partition.tp)
        if txn is None:
            return
        async with txn.lock:
            # Read under the lock: no record can finish between this and the commit.
            position = (partition.offsets.watermark, partition.offsets.metadata())
            try:
                # Kafka may hold a transaction up while it has too few in-sync replicas:
                # the engine holds its work as long as Kafka would keep the transaction.
                with anyio.fail_after(_TRANSACTION_TIMEOUT_MS / 1000):
                    await txn.begin()
                    await self._delivered(txn)
                    await txn.producer.send_offsets_to_transaction(
                        {partition.tp: position}, self._group_id
                    )
                    await txn.producer.commit_transaction()
            except (AIOKafkaError, TimeoutError) as exc:
                # A fenced or failed transaction cannot be repaired here: its outputs are
                # aborted, so the records must be re-run from the last commit. The records
                # marked finished in memory are void: drop the partition's producer so
                # nothing more is committed for it, and crash to let a restart (or the
                # partition's new owner) re-run them from committed state.
                await self.revoked([partition.tp])
                raise translate(
                    exc, self._settings, f"committing the transaction of {partition.tp}"
                ) from exc
            txn.open = False
            partition.committed = position
            self._flowing()

    async def _delivered(self, txn: _Transactional) -> None:
        """Every output of the open transaction acknowledged, or the transaction aborted."""
        pending, txn.pending = txn.pending, []
        for future in pending:
            try:
                await self._acknowledged(future)
            except AIOKafkaError:
                await txn.producer.abort_transaction()
                txn.open = False
                raise
