"""The exactly-once sink: one transactional producer per input partition.

Its `transactional_id` is derived from group, topic and partition, so whoever owns the
partition next fences the previous owner (aiokafka has no group-generation fencing).
Outputs and the partition's offsets (watermark + metadata) commit in one transaction.

A record's outputs go into the transaction's own batches (`stream.engine.batches`, placed
as the at-least-once sink places them), all of them or none, and the batches stay open
until the commit hands them to the producer: no reader sees them before the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import anyio
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import IllegalOperation
from aiokafka.errors import KafkaError as AIOKafkaError

from stream.config import KafkaSettings
from stream.engine.batches import Batch, Batches
from stream.engine.late import watched
from stream.engine.outputs import (
    CLOSE_TIMEOUT_S,
    Output,
    changed_positions,
    learn_topics,
    run_all,
    stage,
    stage_now,
)
from stream.engine.partitions import Partition
from stream.errors import KafkaError
from stream.kafka import quiet_unread_kafka_failures, retrieve, start_client, translate

__all__ = ["ExactlyOnceSink"]

log = logging.getLogger(__name__)

# aiokafka's default, named: Kafka aborts a transaction left open longer, so an exactly-
# once commit waits that long for a cluster that cannot log it, and no longer.
_TRANSACTION_TIMEOUT_MS = 60_000


class _Transactional:
    """The producer of one input partition, and whether its transaction is open."""

    def __init__(self, producer: AIOKafkaProducer, max_request_size: int) -> None:
        self.producer = producer
        self.lock = anyio.Lock()
        self.open = False
        # Open until the commit, which hands them over (`send_all`), in the order opened.
        self.batches = Batches(producer, linger_s=None, max_request_size=max_request_size)
        self.opened: list[Batch] = []
        # Delivery futures of the open transaction: a batch the broker rejects for good
        # (too large, not authorised) fails only its future, and the transaction would
        # still commit the offsets of records whose outputs never landed.
        self.pending: list[Any] = []

    async def begin(self) -> None:
        if not self.open:
            await self.producer.begin_transaction()
            self.open = True


async def _delivered(txn: _Transactional) -> None:
    """Every output of the open transaction handed over and acknowledged, or the
    transaction aborted."""
    opened, txn.opened = txn.opened, []
    txn.pending += await txn.batches.send_all(opened)
    pending, txn.pending = txn.pending, []
    for index, future in enumerate(pending):
        try:
            await future
        except AIOKafkaError:
            txn.open = False
            for later in pending[index + 1 :]:
                later.add_done_callback(retrieve)  # failed too: not each logged unread
            # A fenced producer's transaction cannot be aborted (aiokafka asserts it out of
            # its FATAL state); Kafka aborts it, and so does closing the producer.
            with contextlib.suppress(AIOKafkaError, AssertionError):
                await txn.producer.abort_transaction()
            raise


class ExactlyOnceSink:
    def __init__(
        self,
        settings: KafkaSettings,
        group_id: str,
        producer_options: dict[str, Any],
        topics: Sequence[str] = (),
    ) -> None:
        """`topics`: whose metadata each partition's producer loads when it starts."""
        self._settings = settings
        self._group_id = group_id
        # Its batches are handed over at the commit: the producer lingers no longer.
        self._options = {**producer_options, "linger_ms": 0}
        self._topics = topics
        self._producers: dict[TopicPartition, _Transactional] = {}

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self._group_id}.{tp.topic}.{tp.partition}"

    async def start(self) -> None:
        # producers come with partitions; a fenced one must end in one line, not dozens
        quiet_unread_kafka_failures(asyncio.get_running_loop())

    async def stop(self) -> None:
        await self.revoked(list(self._producers))

    async def assigned(self, tps: Iterable[TopicPartition]) -> None:
        """Start (and so fence any previous owner of) each partition's producer."""
        await run_all(partial(self._start_producer, tp) for tp in tps if tp not in self._producers)

    async def _start_producer(self, tp: TopicPartition) -> None:
        producer = AIOKafkaProducer(
            **self._settings.producer_options(),
            transactional_id=self.transactional_id(tp),
            transaction_timeout_ms=_TRANSACTION_TIMEOUT_MS,
            **self._options,
        )
        started = time.monotonic()
        # init_transactions: bumps the epoch, aborts the old owner's open transaction.
        # Bounded: this runs inside a rebalance callback, which must end; as long as a
        # commit waits for a cluster that cannot log transactions (too few brokers in
        # sync), which the worker rides out (a request timeout ended it at 30 s).
        await start_client(  # cancelled as it starts (a stop, a revoke), it stops in there
            producer,
            self._settings,
            f"starting the exactly-once producer for {tp} (Kafka logs its transaction state "
            f"on min.insync.replicas brokers: are enough of them up?)",
            timeout_s=_TRANSACTION_TIMEOUT_MS / 1000,
        )
        log.debug("transactional producer for %s ready in %.3f s", tp, time.monotonic() - started)
        limit = self._options.get("max_request_size", 1024 * 1024)
        self._producers[tp] = _Transactional(producer, limit)  # first: a revoke now stops it
        await learn_topics(producer, self._topics)

    async def revoked(self, tps: Iterable[TopicPartition]) -> None:
        leaving = [txn for tp in list(tps) if (txn := self._producers.pop(tp, None)) is not None]
        # All at once: a revoke must end within the rebalance timeout, however many leave.
        # An open transaction is aborted by the broker.
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            try:
                for txn in leaving:
                    txn.batches.close()  # its open batches go with its transaction
                await run_all(txn.producer.stop for txn in leaving)
            except (AIOKafkaError, OSError) as exc:
                log.warning("closing a partition's producer failed: %s", exc)

    async def write(self, partition: Partition, offset: int, outputs: Sequence[Output]) -> bool:
        txn = self._producers.get(partition.tp)
        if txn is None:
            return False  # the partition left (its transaction is settled): re-run later
        if txn.open and not txn.lock.locked() and self._takes(partition, txn):
            # The usual record: its transaction open, no commit under way. Staging does not
            # wait (unless a topic's metadata is missing: then it goes the long way), so
            # nothing can come in between, as under the lock and its shield, which cost a
            # timer, a cancel scope and a loop turn a record (~50 µs of CPU, `stream bench
            # --guarantee exactly-once`).
            try:
                staged = stage_now(txn.batches, outputs, partition.tp, None)
            except AIOKafkaError as exc:
                raise translate(exc, self._settings, "producing outputs") from exc
            if not isinstance(staged, str):
                txn.opened += staged[1]
                partition.offsets.finish(offset)
                return True
        # Shielded: the outputs and the "finished" mark go into the transaction together,
        # or neither does (an abandoned record must not leave orphan outputs behind).
        # Bounded all the same: the lock waits at most one commit, the send one request.
        finished = False
        with anyio.move_on_after(
            2 * self._settings.request_timeout_ms / 1000, shield=True
        ) as bound:
            async with txn.lock:
                # The partition may have gone on probation (a rebalance: the engine holds the
                # outputs until it knows) or left while this waited for the lock, even come
                # back with a new producer that must not take this run's outputs.
                if self._takes(partition, txn):
                    try:
                        await txn.begin()
                        _, opened = await stage(txn.batches, outputs, partition.tp, None)
                        txn.opened += opened
                    except AIOKafkaError as exc:
                        raise translate(exc, self._settings, "producing outputs") from exc
                    partition.offsets.finish(offset)
                    finished = True
        if bound.cancelled_caught:
            # Some outputs may be in the open transaction without their record marked
            # finished: committing it would write them twice. Abort it with the producer;
            # what the partition marked finished since its last commit is void.
            await self._void(partition)
            raise KafkaError(
                f"writing outputs of {partition.tp} into its transaction took longer than "
                f"{2 * self._settings.request_timeout_ms / 1000:g} s; the transaction is "
                "aborted and the partition re-runs from its last commit"
            )
        return finished

    def _takes(self, partition: Partition, txn: _Transactional) -> bool:
        """Whether `txn` takes outputs of `partition` now: the partition is surely ours
        (not on probation, not gone) and `txn` is still its producer."""
        ours = not (partition.revoked or partition.abandoned)
        return ours and self._producers.get(partition.tp) is txn

    async def commit(self, partitions: Sequence[Partition]) -> int:
        changed = changed_positions(partitions)
        todo = [p for p in partitions if p in changed or self._is_open(p)]
        await run_all(partial(self._commit_one, partition) for partition in todo)
        return len(todo)

    async def _commit_steps(
        self, txn: _Transactional, partition: Partition, position: tuple[int, str]
    ) -> None:
        await txn.begin()
        await _delivered(txn)
        await txn.producer.send_offsets_to_transaction({partition.tp: position}, self._group_id)
        await txn.producer.commit_transaction()

    async def _void(self, partition: Partition) -> None:
        """Drop the partition's producer (its open transaction is aborted) and what it
        marked finished since its last commit: it re-runs from there."""
        await self.revoked([partition.tp])
        partition.abandon()

    def _is_open(self, partition: Partition) -> bool:
        txn = self._producers.get(partition.tp)
        return txn is not None and txn.open

    async def _commit_one(self, partition: Partition) -> None:
        txn = self._producers.get(partition.tp)
        if txn is None:
            return
        async with txn.lock:
            # Read under the lock: no record can finish between this and the commit.
            position = partition.position()
            try:
                # Kafka holds a transaction up while too few replicas are in sync: wait as
                # long as it would keep the transaction, then re-run from the last commit.
                with anyio.fail_after(_TRANSACTION_TIMEOUT_MS / 1000):
                    await watched(partial(self._commit_steps, txn, partition, position), partition)
            # IllegalOperation: aiokafka left the transaction on an error of its own (the
            # broker went away mid-transaction); it is no Kafka error class of its.
            except (AIOKafkaError, IllegalOperation, TimeoutError) as exc:
                # A fenced or failed transaction cannot be repaired here: its outputs are
                # aborted, so the records must be re-run from the last commit. The records
                # marked finished in memory are void: drop the partition's producer so
                # nothing more is committed for it, and crash to let a restart (or the
                # partition's new owner) re-run them from committed state. Should the
                # partition come back to this worker first, it starts over from there.
                await self._void(partition)
                raise translate(
                    exc, self._settings, f"committing the transaction of {partition.tp}"
                ) from exc
            txn.open = False
            partition.committed = partition.committed_base = position
            partition.write_error = None
