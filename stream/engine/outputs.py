"""Where a stage's outputs go, and how finished offsets are committed with them.

Two sinks, one per delivery guarantee (the second in `stream.engine.transactions`):

- `AtLeastOnceSink`: one idempotent producer (`acks=all`), handed whole batches of the
  sink's own (`stream.engine.batches`). A record counts as finished only once Kafka
  acknowledged every one of its outputs; offsets are committed by the consumer. A crash
  re-runs what was not committed, so an output may appear twice.
- `ExactlyOnceSink`: one transactional producer per input partition, its
  `transactional_id` derived from group, topic and partition, so whoever owns the
  partition next fences the previous owner (aiokafka has no group-generation fencing).
  Outputs (in batches of its own, handed over at the commit) and the partition's offsets
  (watermark + metadata) commit in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import (
    KafkaTimeoutError,
    KafkaUnavailableError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)

from stream.config import CLOSE_RESERVE_S, KafkaSettings
from stream.engine.batches import Abandoned, Batch, Batches
from stream.engine.late import acknowledged
from stream.engine.partitions import Partition
from stream.engine.recovery import HEADER as RECOVERY_HEADER
from stream.engine.recovery import commit_positions, input_headers
from stream.errors import KafkaError, OutputRejectedError
from stream.kafka import quiet_unread_kafka_failures, start_client, translate

__all__ = [
    "CLOSE_TIMEOUT_S",
    "MAX_OUTPUT_BYTES",
    "AtLeastOnceSink",
    "Output",
    "Sink",
    "changed_positions",
    "learn_topics",
    "retry_helps",
    "run_all",
    "stage",
    "stage_now",
]

log = logging.getLogger(__name__)

# The largest record the engine writes: topics/dead-letter.toml's max.message.bytes.
MAX_OUTPUT_BYTES = 2 * 1024 * 1024
_BACKOFF_MAX_S = 5.0
_TOO_LARGE_TRIES = 3
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
_LEARN_TIMEOUT_S = 2.0
# How long each closing step (a producer's stop, a partition's release) may take.
CLOSE_TIMEOUT_S = CLOSE_RESERVE_S


@dataclass(frozen=True, slots=True)
class Output:
    """One record a handler wants written."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    # The partition of the input record whose key this output carries (None: another key,
    # or none). Co-partitioning: when the output's topic has as many partitions as the
    # input's, the output goes to that partition number, so a key stays where the upstream
    # put it, and the producer's partitioner (murmur2 in pure Python) is not run.
    follows: int | None = None


class Sink(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def assigned(self, tps: Iterable[TopicPartition]) -> None: ...
    async def revoked(self, tps: Iterable[TopicPartition]) -> None: ...
    async def write(self, partition: Partition, offset: int, outputs: Sequence[Output]) -> bool:
        """Write the outputs of the record at `offset`, then mark it finished; False when
        the partition left first (the record stays unfinished, for its next owner)."""

    async def commit(self, partitions: Sequence[Partition]) -> int:
        """Commit the partitions' watermarks; return how many changed."""


def changed_positions(partitions: Iterable[Partition]) -> dict[Partition, tuple[int, str]]:
    """The partitions whose position moved since their last commit, with it (no `since`)."""
    changed = {}
    for partition in partitions:
        offsets = partition.offsets
        if offsets.watermark < 0:
            continue  # nothing fetched yet on a partition without a committed offset
        position = partition.position()
        if position != partition.committed_base:
            changed[partition] = position
    return changed


async def _send(
    batches: Batches, outputs: Sequence[Output], partition: Partition, offset: int
) -> None:
    """Put a record's outputs into their partitions' batches, carry the batches it opened
    to the producer, and wait for the acks (`stream.engine.batches`)."""
    staged = stage_now(batches, outputs, partition.tp, offset)
    while isinstance(staged, str):  # (`stage`, inline: a coroutine less per record)
        await batches.learn(staged)
        staged = stage_now(batches, outputs, partition.tp, offset)
    waits, carried = staged
    for index, batch in enumerate(carried):
        try:
            await batches.carry(batch)
        except Exception:
            for later in carried[index + 1 :]:
                batches.abandon(later)  # its writers write again, this one too
            raise
        except BaseException:  # cancelled: what this record carries still goes out
            await batches.rescue(carried[index + 1 :])
            raise
    for batch in waits:
        await acknowledged(batch.future, partition)


def stage_now(
    batches: Batches, outputs: Sequence[Output], source: TopicPartition, offset: int | None
) -> tuple[list[Batch], list[Batch]] | str:
    """The batches the outputs went into, and those of them this record opened (and
    carries); or, placing nothing, the name of a topic whose metadata is missing. With the
    record's `offset`, each output names it in a `stream-input` header
    (`stream.engine.recovery`; a handler's own would name another record)."""
    placed = _placed(batches, outputs, source, offset)
    if isinstance(placed, str):
        return placed
    waits: list[Batch] = []
    carried: list[Batch] = []
    try:
        for tp, key, value, headers in placed:
            batch, opened = batches.add(tp, key, value, headers)
            if opened is not None:
                carried.append(opened)
            if batch not in waits:
                waits.append(batch)
    except BaseException:
        for batch in carried:  # no one else would hand them over
            batches.abandon(batch)
        raise
    return waits, carried


def _placed(
    batches: Batches, outputs: Sequence[Output], source: TopicPartition, offset: int | None
) -> list[tuple[TopicPartition, bytes | None, bytes, list[Any]]] | str:
    """Each output's partition, key, value and headers, all of them checked before any
    goes into a batch; or the name of a topic whose metadata is missing."""
    marks = None if offset is None else input_headers(source, offset, len(outputs))
    placed = []
    for index, o in enumerate(outputs):
        if not batches.knows(o.topic):
            return o.topic
        if o.follows is not None and not batches.knows(source.topic):
            return str(source.topic)
        if marks is None:
            headers = list(o.headers)
        else:
            headers = [h for h in o.headers if h[0] != RECOVERY_HEADER]
            headers.append(marks[index])
        batches.check(o.key, o.value, headers)
        number = batches.place(o.topic, o.key, o.follows, source.topic)
        placed.append((TopicPartition(o.topic, number), o.key, o.value, headers))
    return placed


async def stage(
    batches: Batches, outputs: Sequence[Output], source: TopicPartition, offset: int | None
) -> tuple[list[Batch], list[Batch]]:
    """`stage_now`, first loading the metadata of the topics it needs."""
    staged = stage_now(batches, outputs, source, offset)
    while isinstance(staged, str):  # a topic whose metadata the producer has yet to load
        await batches.learn(staged)
        staged = stage_now(batches, outputs, source, offset)
    return staged


async def learn_topics(producer: AIOKafkaProducer, topics: Iterable[str]) -> None:
    """Load the producer's metadata of `topics` (outputs and inputs: co-partitioning asks
    for both) in one request, before the first output. Without it aiokafka fetches a
    topic's metadata on its first send, and the first outputs after a start wait for it
    behind the work of their own wave: 500 answers arriving together took ~100 ms to get
    the first one into a batch. Best effort, bounded: a topic missing now is reported by
    the first send, as before."""
    names = list(topics)
    if not names:
        return  # an update with no topic named asks for every topic of the cluster
    client = producer.client
    for topic in names:
        client.add_topic(topic)
    with anyio.move_on_after(_LEARN_TIMEOUT_S):
        await client.force_metadata_update()


def retry_helps(exc: AIOKafkaError) -> bool:
    """Whether producing the same outputs again can succeed.

    Kafka's retriable errors can, and so can a timeout, an unavailable cluster, and a
    producer closed under the writer (renewed). Authorization failures, an invalid request
    and a topic that is missing after aiokafka waited a whole request timeout for its
    metadata fail the same way on every try: retrying them would stall the partition for
    ever while the worker looks healthy.
    """
    if isinstance(exc, UnknownTopicOrPartitionError):
        return False
    transient = (KafkaTimeoutError, KafkaUnavailableError, ProducerClosed, OutOfOrderSequenceNumber)
    return bool(exc.retriable) or isinstance(exc, (*transient, *_TOO_LARGE))


async def run_all(steps: Iterable[Callable[[], Awaitable[None]]]) -> None:
    """Run the steps at once and raise the first error alone, not as an exception group:
    callers catch our `KafkaError`, and a group would slip past them (skipping clean-up)."""
    errors: list[Exception] = []

    async def run(step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as group:
        for step in steps:
            group.start_soon(run, step)
    for extra in errors[1:]:
        log.warning("also failed: %s", extra)
    if errors:
        raise errors[0]


class AtLeastOnceSink:
    def __init__(
        self,
        settings: KafkaSettings,
        consumer: AIOKafkaConsumer,
        producer_options: dict[str, Any],
        topics: Sequence[str] = (),
    ) -> None:
        """`topics`: whose metadata the producer loads when it starts (`learn_topics`)."""
        self._settings = settings
        self._consumer = consumer
        # The sink lingers itself (`stream.engine.batches`): its batches go out when due.
        self._linger_s = producer_options.get("linger_ms", 0) / 1000
        self._options = {**producer_options, "linger_ms": 0}
        self._topics = topics
        self._producer = self._new_producer()
        self._batches = self._batches_of(self._producer)
        self._renewing = anyio.Lock()

    def _batches_of(self, producer: AIOKafkaProducer) -> Batches:
        limit = self._options.get("max_request_size", 1024 * 1024)
        return Batches(producer, linger_s=self._linger_s, max_request_size=limit)

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self._settings.producer_options(),
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
                await start_client(fresh, self._settings, "renewing the producer")
            except KafkaError:
                return  # Kafka is away: the writers' retries try again
            self._producer = fresh
            self._batches.close()
            self._batches = self._batches_of(fresh)
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await failed.stop()  # its pending sends fail, and their writers retry
        # After the old one stopped, outside the lock: a writer cancelled while it waits
        # leaves nothing unstopped (`stop` stops the new one).
        await learn_topics(fresh, self._topics)

    async def start(self) -> None:
        # A commit given up on (Kafka paused) leaves aiokafka's request to fail unread.
        quiet_unread_kafka_failures(asyncio.get_running_loop())
        await start_client(self._producer, self._settings, "starting the producer")
        try:
            await learn_topics(self._producer, self._topics)
        except BaseException:  # cancelled while it waits: the started producer is stopped
            await self.stop()
            raise

    async def stop(self) -> None:
        self._batches.close()
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await self._producer.stop()

    async def assigned(self, tps: Iterable[TopicPartition]) -> None:
        pass  # one producer serves every partition

    async def revoked(self, tps: Iterable[TopicPartition]) -> None:
        pass

    async def write(self, partition: Partition, offset: int, outputs: Sequence[Output]) -> bool:
        attempt = too_large = 0
        if not partition.spread:  # once known, not looked for again on every write
            partition.spread = any(output.follows is None for output in outputs)
        while True:
            batches = self._batches
            producer = batches.producer
            try:
                await _send(batches, outputs, partition, offset)
                break
            except Abandoned:
                continue  # none of that batch reached Kafka: into a new one, at once
            except AIOKafkaError as exc:
                # Kafka is down or slow: keep the record unfinished and try again, so its
                # offset is never committed without its outputs.
                too_large = await self._after_failure(exc, producer, partition, offset, too_large)
                attempt += 1
                delay = min(_BACKOFF_MAX_S, 0.1 * 2**attempt) * random.uniform(0.5, 1.0)
                partition.write_error = type(exc).__name__
                log.warning(
                    "producing outputs of %s offset %d failed (%s), retry %d in %.1f s",
                    partition.tp,
                    offset,
                    type(exc).__name__,
                    attempt,
                    delay,
                )
                await anyio.sleep(delay)
        partition.write_error = None
        partition.offsets.finish(offset)
        return True

    async def _after_failure(
        self,
        exc: AIOKafkaError,
        producer: AIOKafkaProducer,
        partition: Partition,
        offset: int,
        too_large: int,
    ) -> int:
        """Raise when another try cannot help; else get ready for it. Returns the count of
        too-large refusals so far."""
        if not retry_helps(exc):
            raise translate(exc, self._settings, f"producing outputs of {partition.tp}") from exc
        if isinstance(exc, (*_TOO_LARGE, OutOfOrderSequenceNumber)):
            await self._renew(producer, type(exc).__name__)
        if isinstance(exc, _TOO_LARGE):
            # The broker judges whole batches: a small output fails with the big one it was
            # batched with, so it gets tries of its own. Past those, the same bytes fail the
            # same way, and retrying would stall the partition.
            too_large += 1
            if too_large >= _TOO_LARGE_TRIES:
                raise OutputRejectedError(
                    f"Kafka refused an output of {partition.tp} offset {offset} for good "
                    f"({type(exc).__name__}): larger than its topic's max.message.bytes"
                ) from exc
        return too_large

    async def commit(self, partitions: Sequence[Partition]) -> int:
        # With a `since` note: where a next owner looks for outputs sent after this
        # commit (or before it, still unacknowledged) should this worker die.
        now_monotonic = time.monotonic()
        due = commit_positions(partitions, time.time(), now_monotonic)
        if not due:
            return 0
        offsets = {partition.tp: full for partition, (_, full) in due.items()}
        try:
            with anyio.fail_after(self._settings.request_timeout_ms / 1000):
                await self._consumer.commit(offsets)
        except (AIOKafkaError, TimeoutError) as exc:
            raise translate(exc, self._settings, "committing offsets") from exc
        for partition, (base, full) in due.items():
            partition.committed, partition.committed_base = full, base
            partition.committed_at = now_monotonic
        return len(due)
