"""Outputs gathered into record batches of the sink's own, handed to the producer whole.

aiokafka's `send` costs, for every output, two coroutines, a size estimate, a partition
look-up that copies the topic's partition set four times, a future, and the sender's work
of settling that future. Here an output is appended to the open batch of its topic
partition (aiokafka's batch builder, in C) and shares the batch's one future.

Who hands a batch over: the writer that opened it (its carrier) waits `linger` seconds, or
less when the batch fills, then hands it to the producer (`send_batch`; it waits while the
partition's previous batch is still queued there) and waits for the ack like every other
writer in it. No task of its own: a carrier cancelled before the hand-over (its record
abandoned: a shutdown's grace over, its partition gone) still hands the batch over,
shielded and bounded, as aiokafka sent what it had queued: the answers in it were paid
for, and a next owner's recovery finds them rather than calling again. A batch its carrier
fails to put its outputs in is abandoned: its other writers write theirs again, into a
new batch (`Abandoned`: none of it reached Kafka). The exactly-once sink's batches have no
linger and no carrier: its commit hands them over (`send_all`).

Placement is aiokafka's: an output that follows its input's partition goes to that
partition number when both topics have as many partitions (co-partitioning); any other
by the murmur2 hash of its key, or at random without one. What the cluster's metadata
says per topic is kept until the producer's next metadata update.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import anyio
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, UnknownTopicOrPartitionError
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from stream.config import CLOSE_RESERVE_S

__all__ = ["Abandoned", "Batch", "Batches"]


class Abandoned(KafkaError):  # type: ignore[misc]  # aiokafka's errors are untyped
    """The batch was never handed to Kafka (its carrier was cancelled): write again."""

    retriable = True


def follows_partition(follows: int, ours: Collection[int], theirs: int) -> int | None:
    """Co-partitioning: the input's partition number, `follows`, for an output of its key
    when the output's topic has as many partitions (`ours`) as the input's (`theirs`, a
    count); else None, and the key's hash places it."""
    return follows if follows in ours and len(ours) == theirs else None


class _Topic(NamedTuple):
    partitions: tuple[int, ...]  # sorted, as the partitioner expects
    available: tuple[int, ...]  # with a leader now


class Batch:
    """One open or handed-over batch of a topic partition, and the future of its ack."""

    __slots__ = ("builder", "due", "future", "handed", "timer", "tp")

    def __init__(self, tp: TopicPartition, builder: Any, loop: asyncio.AbstractEventLoop):
        self.tp = tp
        self.builder = builder
        self.future: asyncio.Future[Any] = loop.create_future()
        self.due: asyncio.Future[None] = loop.create_future()  # set: hand it over now
        self.timer: asyncio.TimerHandle | None = None  # when it is due at the latest
        self.handed = False  # to the producer, whose verdict settles `future`

    def close(self) -> None:
        """No more outputs go in; its carrier hands it over now."""
        if not self.due.done():
            self.due.set_result(None)
        if self.timer is not None:
            self.timer.cancel()

    def settle(self, acked: asyncio.Future[Any]) -> None:
        """Copy the producer's verdict on the batch to its writers' future."""
        if acked.cancelled():
            self._error(Abandoned("the producer dropped the batch"))
        elif (exc := acked.exception()) is not None:
            self._error(exc)
        elif not self.future.done():
            self.future.set_result(acked.result())

    def fail(self, exc: BaseException) -> None:
        """Its writers get `exc`, unless the producer has the batch: its verdict counts."""
        if not self.handed:
            self._error(exc)

    def _error(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()  # read: no "never retrieved" log when no one waits


class Batches:
    """The open batch of every topic partition one producer writes to."""

    def __init__(
        self, producer: AIOKafkaProducer, *, linger_s: float | None, max_request_size: int
    ):
        """`linger_s`: how long a batch stays open at most; None, until `send_all`."""
        self.producer = producer
        self._linger_s = linger_s
        self._max_request_size = max_request_size
        self._open: dict[TopicPartition, Batch] = {}
        self._topics: dict[str, _Topic] = {}
        self._cluster = producer.client.cluster
        self._cluster.add_listener(self._forget)
        self._following = True

    def close(self) -> None:
        """Stop following the producer's metadata; open batches are left to their carriers
        (their hand-over fails on a stopped producer, and their writers retry)."""
        if self._following:
            self._following = False
            self._cluster.remove_listener(self._forget)

    def _forget(self, _cluster: object) -> None:
        self._topics.clear()  # metadata changed: partition counts and leaders are asked again

    async def learn(self, topic: str) -> None:
        """Wait for the metadata of `topic` (UnknownTopicOrPartition after the producer's
        request timeout without it), for `place`."""
        partitions = self._cluster.partitions_for_topic(topic)
        if not partitions:
            partitions = await self.producer.partitions_for(topic)
        available = self._cluster.available_partitions_for_topic(topic) or ()
        self._topics[topic] = _Topic(tuple(sorted(partitions)), tuple(available))

    def knows(self, topic: str) -> bool:
        return topic in self._topics

    def place(self, topic: str, key: bytes | None, follows: int | None, source: str) -> int:
        """The partition number of an output (see the module docstring), once `topic`, and
        `source` when it `follows` one, are known (`learn`)."""
        target = self._topics[topic]
        if not target.partitions:
            raise UnknownTopicOrPartitionError()
        if follows is not None:
            theirs = len(self._topics[source].partitions)
            if (number := follows_partition(follows, target.partitions, theirs)) is not None:
                return number
        if key is not None:
            hashed: int = murmur2(key) & 0x7FFFFFFF
            return target.partitions[hashed % len(target.partitions)]
        return random.choice(target.available or target.partitions)

    def check(self, key: bytes | None, value: bytes, headers: Sequence[Any]) -> None:
        """Raise if an output could never be sent: a record's outputs are checked before
        any of them goes into a batch, so a refused one leaves none of its siblings behind
        (in a transaction, they would commit without their record)."""
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > self._max_request_size:
            raise MessageSizeTooLargeError(
                f"an output of {size} bytes is over the producer's {self._max_request_size}"
            )

    def add(
        self, tp: TopicPartition, key: bytes | None, value: bytes, headers: Sequence[Any]
    ) -> tuple[Batch, Batch | None]:
        """Append an output (`check`ed) to the open batch of `tp`: (its batch, and the
        batch the caller must carry when it opened one, else None)."""
        batch = self._open.get(tp)
        if batch is not None:
            appended = batch.builder.append(timestamp=None, key=key, value=value, headers=headers)
            if appended is not None:
                return batch, None
            self._close(batch)  # full: its carrier hands it over at once
        batch = self._new(tp)
        # The first output always fits (a batch holds at least one, whatever its size).
        batch.builder.append(timestamp=None, key=key, value=value, headers=headers)
        return batch, batch

    def _new(self, tp: TopicPartition) -> Batch:
        loop = asyncio.get_running_loop()
        batch = self._open[tp] = Batch(tp, self.producer.create_batch(), loop)
        if self._linger_s is not None:
            batch.timer = loop.call_later(self._linger_s, self._close, batch)
        return batch

    def _close(self, batch: Batch) -> None:
        if self._open.get(batch.tp) is batch:
            del self._open[batch.tp]
        batch.close()

    async def carry(self, batch: Batch) -> None:
        """Hand `batch` to the producer once it is due; its writers then wait for the ack.
        Cancelled first (its record abandoned: a shutdown's grace over, its partition gone),
        it still hands the batch over (`rescue`): the answers in it are paid for."""
        try:
            await batch.due
            await self._hand_over(batch)
        except Exception as exc:
            self._close(batch)
            batch.fail(exc)
            raise
        except BaseException:
            await self.rescue([batch])
            raise

    async def rescue(self, batches: Sequence[Batch]) -> None:
        """Hand over batches whose carrier was cancelled, shielded and bounded: as aiokafka
        sent what it had queued when its sender was cancelled, so a next owner's recovery
        finds these answers (`stream.engine.recovery`) instead of paying for them again."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_RESERVE_S):
            for batch in batches:
                self._close(batch)
                try:
                    await self._hand_over(batch)
                except Exception as exc:
                    batch.fail(exc)
        for batch in batches:
            batch.fail(Abandoned("not handed over in time after its carrier was stopped"))

    async def send_all(self, batches: Sequence[Batch]) -> list[asyncio.Future[Any]]:
        """Close `batches` and hand them over, in order (a transaction's, at its commit):
        the futures of their acks."""
        for batch in batches:
            self._close(batch)
            await self._hand_over(batch)
        return [batch.future for batch in batches]

    async def _hand_over(self, batch: Batch) -> None:
        acked = await self.producer.send_batch(
            batch.builder, batch.tp.topic, partition=batch.tp.partition
        )
        batch.handed = True
        acked.add_done_callback(batch.settle)

    def abandon(self, batch: Batch) -> None:
        """Its carrier will not hand it over (it failed before): its writers write again."""
        self._close(batch)
        batch.fail(Abandoned("its carrier failed before handing it over"))
