"""Kafka clients as every command uses them: started and stopped whatever happens, their
failures as our `KafkaError` (the sentences: `stream.kafkaerrors`), retried while Kafka
says to retry."""

from __future__ import annotations

import asyncio
import itertools
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any, TypeVar

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import ProducerFenced
from aiokafka.structs import TopicPartition

from stream.config import CLOSE_RESERVE_S, KafkaSettings
from stream.errors import ConfigError
from stream.inflate import bound_inflation
from stream.kafkaerrors import Verdict, connected, probe, translate, translated
from stream.kafkawire import group_committed, ride_out_lost_coordinators

__all__ = [
    "CANCELLED_CLOSE_S",
    "admin_client",
    "consumer_client",
    "group_offsets",
    "producer_client",
    "retrying",
    "Verdict",
    "connected",
    "probe",
    "quiet_unread_kafka_failures",
    "retrieve",
    "start_client",
    "stop_client",
    "topic_partitions",
    "transient",
    "translate",
    "translated",
]

# How long a client may take to stop on the way out of an error or a cancellation (Ctrl-C:
# what it had not sent is not waited for long), against CLOSE_RESERVE_S on a clean exit.
CANCELLED_CLOSE_S = 2.0
_COORDINATOR_TRIES = 16  # about 13 s of back-off in all

T = TypeVar("T")


class _AdminClient(AIOKafkaAdminClient):  # type: ignore[misc]
    """aiokafka's admin client sends a request that names no broker to a random known one,
    and never tries another: with one broker of three down, a third of them would fail.
    This one takes the first broker that answers, in random order, and reads the metadata
    again when none does (a dead broker leaves it once the controllers fence it)."""

    async def _send_request(self, request: Any, node_id: int | None = None) -> Any:
        if node_id is None:
            node_id = await self._answering_node()
        return await self._client.send(node_id, request)

    async def _answering_node(self) -> int | None:
        client = self._client
        for _round in range(2):
            nodes = [broker.nodeId for broker in client.cluster.brokers()]
            random.shuffle(nodes)
            for node in nodes:
                if await client.ready(node):
                    return int(node)
            with anyio.move_on_after(5.0):
                await client.force_metadata_update()
        fallback: int | None = client.get_random_node()
        return fallback  # none answers: `send` fails as aiokafka's would


async def start_client(
    client: Any,
    settings: KafkaSettings,
    doing: str,
    *,
    timeout_s: float | None = None,
    stop_if_cancelled: bool = True,
) -> None:
    """Start an aiokafka client (consumer, producer or admin). When it cannot start, stop
    it (its sockets and tasks are already open) and raise our `KafkaError`, which says what
    we were `doing`. With `timeout_s`, a start that hangs fails too. Cancelled while it
    starts, it is stopped too (shielded, within CANCELLED_CLOSE_S: left to the collector,
    its sockets failed whichever test it ran in), unless `stop_if_cancelled` is False: the
    engine stops its consumer itself, outside its cancelled start-up scope (stopped in
    here, a consumer cancelled in its first join took seconds to leave, and cut short by
    the bound it left its connections open)."""
    if isinstance(client, AIOKafkaProducer) and client._txn_manager is not None:
        ride_out_lost_coordinators(client)
    try:
        with anyio.fail_after(timeout_s):
            await client.start()
    except (AIOKafkaError, OSError, TimeoutError) as exc:
        await stop_client(client)
        raise await translated(exc, settings, doing) from exc
    except BaseException:  # cancelled (or a bug): what its start opened is open
        if stop_if_cancelled:
            with suppress(AIOKafkaError, OSError):  # the cancellation is what goes on
                await stop_client(client, within=CANCELLED_CLOSE_S)
        raise
    connected(settings)


async def stop_client(client: Any, *, within: float = CLOSE_RESERVE_S) -> None:
    """Stop (or, for an admin client, close) an aiokafka client: also when the caller is
    being cancelled (shielded), for at most `within` seconds (a producer's stop waits for
    its pending sends, which a Kafka that is away never answers)."""
    stop = client.close if isinstance(client, AIOKafkaAdminClient) else client.stop
    with anyio.move_on_after(within, shield=True):
        if isinstance(client, AIOKafkaConsumer):
            # A consumer without a group starts a task that, stopped before its first step,
            # raises CancelledError out of the stop (aiokafka 0.14's NoGroupCoordinator):
            # stopped the instant it started, after a failure, it would pass for a cancel.
            await anyio.lowlevel.checkpoint()
        await stop()


@asynccontextmanager
async def admin_client(settings: KafkaSettings, *, doing: str) -> AsyncIterator[Any]:
    """A started admin client (`_AdminClient`); failures to connect become our `KafkaError`."""
    admin = _AdminClient(**settings.client_options())
    async with _started(admin, settings, doing):
        yield admin


@asynccontextmanager
async def consumer_client(
    settings: KafkaSettings, *, doing: str, **options: Any
) -> AsyncIterator[Any]:
    """A started `AIOKafkaConsumer` that never commits on its own (callers decide when);
    a batch it reads inflates within `stream.inflate`'s bound."""
    bound_inflation(settings.max_batch_bytes)
    consumer = AIOKafkaConsumer(**settings.client_options(), enable_auto_commit=False, **options)
    async with _started(consumer, settings, doing):
        yield consumer


@asynccontextmanager
async def producer_client(
    settings: KafkaSettings, *, doing: str, **options: Any
) -> AsyncIterator[Any]:
    """A started idempotent producer (`acks=all`): a retried send is never written twice.
    `options`: more of aiokafka's producer options (`max_request_size`)."""
    producer = AIOKafkaProducer(
        **settings.producer_options(), **options, enable_idempotence=True, acks="all"
    )
    async with _started(producer, settings, doing):
        yield producer


@asynccontextmanager
async def _started(client: Any, settings: KafkaSettings, doing: str) -> AsyncIterator[None]:
    """A client started (and stopped on the way out); failing to start, our `KafkaError`."""
    await start_client(client, settings, doing)
    try:
        yield
    except BaseException:
        await stop_client(client, within=CANCELLED_CLOSE_S)
        raise
    await stop_client(client)


async def retrying(call: Callable[[], Awaitable[T]], *, tries: int = _COORDINATOR_TRIES) -> T:
    """`call()`, again while Kafka says to retry, with back-off, `tries` times at most. On
    a young cluster the offsets topic is created by the first coordinator look-up, and
    every group request fails (retriably) until it exists: a second or two."""
    for attempt in itertools.count():
        try:
            return await call()
        except AIOKafkaError as exc:
            if not exc.retriable or attempt >= tries - 1:
                raise
            await anyio.sleep(min(1.0, 0.1 * 2**attempt))
    raise AssertionError("unreachable")


def transient(exc: BaseException) -> bool:
    """Whether Kafka said to try again: a group coordinator or a leader moving, a broker not
    ready, a connection lost. Our `KafkaError` is transient when the aiokafka error it was
    translated from (its `__cause__`) is retriable; anything else (credentials, ACLs, a
    missing topic, a setting Kafka refuses) will fail the same way again."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AIOKafkaError):
            return bool(seen.retriable)
        if isinstance(seen, OSError) and not isinstance(seen, ssl.SSLError):
            return True  # a connection reset or refused: the broker may be back soon
        seen = seen.__cause__
    return False


async def group_offsets(
    admin: Any, group: str, tps: list[Any] | None = None, *, tries: int = _COORDINATOR_TRIES
) -> dict[Any, Any]:
    """The group's committed offsets on `tps` (None: everywhere), retried while Kafka says
    to (a young cluster, a coordinator moving), `tries` times at most. Never committed:
    left out."""
    return await retrying(partial(group_committed, admin, group, tps), tries=tries)


async def topic_partitions(
    kafka: KafkaSettings, topics: list[str]
) -> dict[str, list[TopicPartition]]:
    """Every partition of each topic, or a `ConfigError` that says how to create a missing
    one. Asked of the admin API: a consumer only knows topics it has already fetched."""
    async with admin_client(kafka, doing="reading topics") as admin:
        try:
            existing = set(await admin.list_topics())
            for topic in topics:
                if topic not in existing:
                    raise ConfigError(
                        f"topic {topic} does not exist: create the declared topics with "
                        "`stream topics apply` (and check STREAM_TOPIC_PREFIX)"
                    )
            described = await admin.describe_topics(topics)
        except AIOKafkaError as exc:
            raise await translated(exc, kafka, "reading topics") from exc
    return {
        d["topic"]: sorted(TopicPartition(d["topic"], p["partition"]) for p in d["partitions"])
        for d in described
    }


def quiet_unread_kafka_failures(loop: asyncio.AbstractEventLoop) -> None:
    """aiokafka fails futures of its own that nobody awaits, and asyncio logs each as
    "never retrieved", tracebacks and all, after our one line that says what happened:
    fenced, a transaction's waiter and the batches' drain waiters; and a commit we gave up
    waiting for (Kafka paused past the request timeout), whose shielded request fails later
    (Python 3.11's `shield` drops the inner task's failure once the outer is cancelled).
    Drop those, pass on everything else. Once per loop."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiet_unread_kafka_failures", False):
        return

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc, future = context.get("exception"), context.get("future")
        if future is not None and (
            isinstance(exc, ProducerFenced)
            or (isinstance(exc, AIOKafkaError) and _coroutine_name(future) in _UNAWAITED)
        ):
            return
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    handle.quiet_unread_kafka_failures = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handle)


# aiokafka's coroutines whose task a cancelled caller leaves behind (see above).
_UNAWAITED = frozenset({"GroupCoordinator._do_commit_offsets"})


def _coroutine_name(future: Any) -> str | None:
    get_coro = getattr(future, "get_coro", None)
    coroutine = get_coro() if get_coro is not None else None
    return getattr(coroutine, "__qualname__", None)


def retrieve(future: asyncio.Future[Any]) -> None:
    """A done callback that reads a future's failure (asyncio logs one nobody read)."""
    if not future.cancelled():
        future.exception()
