"""The one writer of a backfill run: a transactional producer with a fixed id per command
and target, so that two runs of the same command never both write.

This is Kafka's own answer to "two instances doing the same work" (Kafka Streams' and
Connect's exactly-once tasks): a producer that starts with a `transactional.id` fences
every earlier producer with that id. Kafka aborts the older one's open transaction and
refuses its later writes and commits, so at any moment one run writes, and the run that
starts reads the target only after that: it sees everything the older one committed. A run
that was SIGKILLed mid-batch leaves a transaction open; the next run's start aborts it
(Kafka does after `TRANSACTION_TIMEOUT_MS` anyway), and `read_committed` readers (the
workers) never see its records, so nothing it half-sent runs twice.

A dry run writes nothing and takes no producer: it never stops a run that is writing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
    contextmanager,
    nullcontext,
)
from typing import Any, Protocol

import anyio
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import ProducerFenced

from stream.backfill.target import MAX_REQUEST_SIZE
from stream.config import Settings
from stream.errors import FencedError, KafkaError
from stream.kafka import (
    CANCELLED_CLOSE_S,
    quiet_unread_kafka_failures,
    retrieve,
    start_client,
    stop_client,
)

__all__ = [
    "TRANSACTION_TIMEOUT_MS",
    "Expired",
    "Refused",
    "Transaction",
    "exclusive_producer",
    "taken_over",
    "transaction",
    "writer",
]

# A transaction holds back `read_committed` readers of the partitions it writes until it
# ends: one that a killed run left open is aborted by Kafka after this long (a batch is
# sent and committed in well under a second; a paced one commits about every second).
TRANSACTION_TIMEOUT_MS = 20_000
# Ctrl-C while Kafka commits or aborts: how long to wait for its answer, so the report
# counts a commit that landed.
_SETTLE_S = 10.0


class Refused(Exception):
    """Kafka refused a record of the open transaction: abort it, send the rest again."""


class Expired(ProducerFenced):  # type: ignore[misc]
    """Fenced after the open transaction outlived `TRANSACTION_TIMEOUT_MS`: Kafka aborted
    it itself (it stopped answering meanwhile), not another run's start."""


class Options(Protocol):
    """What `writer` reads of a run's options (frozen dataclasses)."""

    @property
    def target(self) -> str: ...

    @property
    def dry_run(self) -> bool: ...


def writer(
    settings: Settings, transactional_id: str, options: Options
) -> AbstractAsyncContextManager[Any]:
    """A run's one producer (`exclusive_producer`); a dry run has none (None), so it never
    fences a real run."""
    if options.dry_run:
        return nullcontext(None)
    doing = f"starting the producer for {options.target}"
    return exclusive_producer(settings, transactional_id=transactional_id, doing=doing)


@asynccontextmanager
async def exclusive_producer(
    settings: Settings, *, transactional_id: str, doing: str
) -> AsyncIterator[Any]:
    """A started transactional producer (`acks=all`, idempotent). Starting it fences every
    earlier producer with `transactional_id` and settles its open transaction."""
    kafka = settings.kafka
    producer = AIOKafkaProducer(
        **kafka.producer_options(),
        transactional_id=transactional_id,
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        max_request_size=MAX_REQUEST_SIZE,
    )
    quiet_unread_kafka_failures(asyncio.get_running_loop())
    await start_client(producer, kafka, doing, timeout_s=kafka.request_timeout_ms / 1000)
    try:
        yield producer
    except BaseException:
        await stop_client(producer, within=CANCELLED_CLOSE_S)
        raise
    await stop_client(producer)


class Transaction:
    """The sends of one open transaction, so that none is left unanswered when it ends."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self.sent: list[asyncio.Future[Any]] = []

    async def send(self, topic: str, value: bytes | None, **options: Any) -> Any:
        """`producer.send`: the future of Kafka's answer to one record."""
        answer = await self.producer.send(topic, value, **options)
        self.sent.append(answer)
        return answer

    def forget(self) -> None:
        # a send of an aborted (or fenced) transaction fails: read its error, or asyncio
        # logs each as "never retrieved"
        for answer in self.sent:
            answer.add_done_callback(retrieve)


@asynccontextmanager
async def transaction(
    producer: Any, *, on_commit: Callable[[], None]
) -> AsyncIterator[Transaction]:
    """One transaction around the block: committed when the block ends (then `on_commit`,
    even when Ctrl-C came while Kafka committed), aborted when it raises or is cancelled.
    A producer Kafka fenced raises aiokafka's `ProducerFenced`."""
    _raise_fatal(producer)
    await producer.begin_transaction()
    began = time.monotonic()
    txn = Transaction(producer)
    try:
        yield txn
    except BaseException as exc:
        with _expired(exc, began):
            await _abort(txn)
        raise
    try:
        await _settled(producer.commit_transaction(), on_commit)
    except BaseException as exc:
        txn.forget()
        with _expired(exc, began):
            _raise_fatal(producer)
        raise


@contextmanager
def _expired(error: BaseException, began: float) -> Iterator[None]:
    """A fence (in `error`, or raised in the block) of a transaction open longer than Kafka
    keeps one is raised as `Expired`."""
    try:
        if isinstance(error, ProducerFenced):
            raise error
        yield
    except ProducerFenced as fenced:
        if time.monotonic() - began < TRANSACTION_TIMEOUT_MS / 1000:
            raise
        raise Expired(str(fenced)) from fenced


async def _abort(txn: Transaction) -> None:
    txn.forget()
    _raise_fatal(txn.producer)
    try:
        await _settled(txn.producer.abort_transaction())
    except AIOKafkaError:
        pass  # unreachable: Kafka aborts it (at the latest on timeout)


def _raise_fatal(producer: Any) -> None:
    """Raise the error that ended the producer's transactions for good (fenced): aiokafka
    keeps it in its transaction manager and answers later calls with assertion errors."""
    manager = producer._txn_manager  # aiokafka has no public accessor
    if manager.is_fatal_error():
        error = manager.wait_for_transaction_end().exception()
        raise error or ProducerFenced()


async def _settled(call: Awaitable[None], done: Callable[[], None] | None = None) -> None:
    """Await `call` and then `done()`; cancelled meanwhile (Ctrl-C), wait a bounded time
    for Kafka's answer first, so that `done()` runs if and only if `call` succeeded."""
    task = asyncio.ensure_future(call)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # Shielded: the run's cancel scope (`stream.interrupts`) keeps cancelling, and an
        # unshielded wait ended at once: a commit that landed went uncounted.
        with anyio.move_on_after(_SETTLE_S, shield=True):
            await asyncio.wait([task])
        if task.done() and not task.cancelled() and task.exception() is None and done:
            done()
        raise
    if done is not None:
        done()


def taken_over(
    command: str, transactional_id: str, target: str, fenced: BaseException | None = None
) -> FencedError | KafkaError:
    """The one line a fenced run ends with (`fenced`: what Kafka raised)."""
    if isinstance(fenced, Expired):
        return KafkaError(
            f"Kafka did not answer this `stream {command}` for over "
            f"{TRANSACTION_TIMEOUT_MS // 1000} s and aborted its open transaction (the copies "
            "since its last commit are not written; what it committed stays): run the same "
            "command again once Kafka answers, and it carries on from there"
        )
    return FencedError(
        f"Kafka fenced this `stream {command}` (transactional id {transactional_id}): another "
        f"run writing {target} started and carries on from what this one committed, or a "
        f"batch took longer than {TRANSACTION_TIMEOUT_MS // 1000} s; let the other run finish "
        "(or run the same command again) to see the totals"
    )
