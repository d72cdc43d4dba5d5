"""Kafka client construction and error translation, shared by every command.

aiokafka raises its own exception types, and a cluster that is down shows up as a
`KafkaConnectionError` deep inside a start-up call; this module turns those into our
`KafkaError` with a sentence that says what to check.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, NamedTuple, TypeVar

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    InvalidSessionTimeoutError,
    KafkaConnectionError,
    NodeNotReadyError,
    ProducerFenced,
    UnknownTopicOrPartitionError,
)
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.structs import TopicPartition

from stream.config import KafkaSettings
from stream.errors import ConfigError, KafkaError
from stream.kafkawire import group_committed, ride_out_lost_coordinators

__all__ = [
    "admin_client",
    "consumer_client",
    "group_offsets",
    "producer_client",
    "retrying",
    "Verdict",
    "connected",
    "probe",
    "quiet_when_fenced",
    "retrieve",
    "start_client",
    "stop_client",
    "topic_partitions",
    "transient",
    "translate",
    "translated",
]

_COORDINATOR_TRIES = 16  # about 13 s of back-off in all

T = TypeVar("T")
_TLS_PROBE_S = 3.0
_TCP_PROBE_S = 1.0
# the same settings can come from a Kafka client properties file (stream.clientconfig)
_OR_FILE = " (or their keys in the --command-config file)"


def translate(exc: BaseException, settings: KafkaSettings, doing: str) -> KafkaError:
    """Our `KafkaError` for a foreign one, saying what we were doing and where.

    No I/O: what a bare "unable to bootstrap" hides (a certificate the CA did not sign, a port
    that answers but lets us not in) comes from the last `probe` of these settings, if any.
    Call sites that can await use `translated`, which probes first."""
    where = settings.bootstrap_servers
    detail = str(exc) or type(exc).__name__
    if "Authentication" in detail or "SaslAuthenticationFailed" in detail:
        return KafkaError(
            f"Kafka at {where} rejected our credentials while {doing}: check "
            "STREAM_KAFKA_SASL_USERNAME, STREAM_KAFKA_SASL_PASSWORD and "
            f"STREAM_KAFKA_SASL_MECHANISM{_OR_FILE}"
        )
    if isinstance(exc, NodeNotReadyError) and "," in where:
        # The client reached the cluster, and lost one broker of several (gone a while):
        # the others answer, so "is it running?" would send the reader the wrong way.
        return KafkaError(
            f"cannot reach a broker of Kafka at {where} while {doing} ({detail}): is one "
            "down or restarting? The others answer; this goes on once it is back or its "
            "partitions have new leaders"
        )
    if isinstance(exc, (KafkaConnectionError, NodeNotReadyError)):
        # NodeNotReady: the client's connection to a broker is down (a broker gone a while)
        return _connection_error(settings, doing, _verdicts.get(settings))
    name = type(exc).__name__
    if isinstance(exc, UnknownTopicOrPartitionError):
        return KafkaError(
            f"a topic is missing on {where} while {doing}: create the declared topics with "
            "`stream topics apply` (and check STREAM_TOPIC_PREFIX)"
        )
    if isinstance(exc, InvalidSessionTimeoutError):
        return KafkaError(
            f"Kafka at {where} refused the consumer's session timeout while {doing}: set "
            "STREAM_SESSION_TIMEOUT_MS within the brokers' group.min.session.timeout.ms and "
            "group.max.session.timeout.ms (6000 and 1800000 by default)"
        )
    if "Authorization" in name:
        return KafkaError(
            f"Kafka at {where} did not allow {doing} ({name}): grant this user ACLs on the "
            "topics, groups and transactional ids (kafka-acls; the README's 'On a secured "
            "cluster' lists them), or use another user"
        )
    return KafkaError(f"Kafka at {where} failed while {doing}: {detail}")


async def translated(exc: BaseException, settings: KafkaSettings, doing: str) -> KafkaError:
    """`translate`, after probing what a connection error hides (asynchronously, once per
    settings until a client of them connects again)."""
    if isinstance(exc, (KafkaConnectionError, NodeNotReadyError)):
        await probe(settings)
    return translate(exc, settings, doing)


def _connection_error(settings: KafkaSettings, doing: str, verdict: Verdict | None) -> KafkaError:
    where = settings.bootstrap_servers
    if verdict is not None and verdict.tls_problem:
        return KafkaError(
            f"TLS to Kafka at {where} failed while {doing} ({verdict.tls_problem}): check "
            "STREAM_KAFKA_SSL_CAFILE (the CA that signed the broker's certificate), the host "
            f"name in KAFKA_BOOTSTRAP_SERVERS, and STREAM_KAFKA_SECURITY_PROTOCOL{_OR_FILE}"
        )
    if verdict is not None and verdict.accepts_tcp and settings.sasl_mechanism:
        # aiokafka logs the SASL failure and raises a bare "unable to bootstrap": a port that
        # answers but a client that cannot get in is, in practice, a credentials problem.
        return KafkaError(
            f"Kafka at {where} accepted the connection but rejected our credentials while "
            f"{doing}: check STREAM_KAFKA_SASL_USERNAME, STREAM_KAFKA_SASL_PASSWORD, "
            f"STREAM_KAFKA_SASL_MECHANISM and STREAM_KAFKA_SECURITY_PROTOCOL{_OR_FILE}"
        )
    if verdict is not None and verdict.unresolved:
        return KafkaError(
            f"cannot reach Kafka at {where} while {doing}: no address for "
            f"{', '.join(verdict.unresolved)} (DNS): check the host names in "
            f"KAFKA_BOOTSTRAP_SERVERS{_OR_FILE}"
        )
    # the address may come from the flag or the variable (the flag wins): no telling
    # which here, so the hint names both, in that order
    return KafkaError(
        f"cannot reach Kafka at {where} while {doing}: is it running? "
        f"({_start_hint(where)}, or fix the address: --bootstrap-server, else "
        "KAFKA_BOOTSTRAP_SERVERS)"
    )


_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
_LOCAL_PORT = 9092  # where `stream kafka start` listens without --port


def _start_hint(bootstrap: str) -> str:
    """How to start what `bootstrap` names on loopback: the local broker for one server
    (`stream kafka start`, with its --port), the local cluster for several (`--brokers N`,
    brokers on consecutive ports); nothing local for remote servers."""
    given = [server.strip() for server in bootstrap.split(",") if server.strip()]
    servers = given or [f"127.0.0.1:{_LOCAL_PORT}"]
    hosts, ports = zip(*(server.rpartition(":")[::2] for server in servers), strict=True)
    if not all(host in _LOOPBACK for host in hosts) or not all(p.isdigit() for p in ports):
        return "start its brokers" if len(servers) > 1 else "start it"
    first = min(map(int, ports))
    if len(servers) < 2:
        port = "" if first == _LOCAL_PORT else f" --port {first}"
        return f"start a local one with `stream kafka start{port}`"
    command = f"stream kafka start --brokers {len(servers)} --port {first}"
    return f"a local cluster starts with `{command}`"


class Verdict(NamedTuple):
    """What a probe of the first bootstrap server found."""

    tls_problem: str | None  # why the TLS handshake failed, when it did
    accepts_tcp: bool  # the port answers (checked only where SASL could be the problem)
    unresolved: tuple[str, ...] = ()  # every bootstrap host, when none of them resolves


# One verdict per settings, probed at the first connection error and kept until a client of
# those settings connects again: a monitor failing every round on a cluster that is down
# probes once, not every round (and never on the event loop: the probes are asynchronous).
_verdicts: dict[KafkaSettings, Verdict] = {}


async def probe(settings: KafkaSettings) -> Verdict:
    """Probe the first bootstrap server (TLS handshake, TCP connect), once per settings."""
    verdict = _verdicts.get(settings)
    if verdict is None:
        tls_problem = await _tls_problem(settings)
        accepts = (
            tls_problem is None
            and bool(settings.sasl_mechanism)
            and await _accepts_tcp(settings.bootstrap_servers)
        )
        unresolved = () if tls_problem or accepts else await _unresolved(settings.bootstrap_servers)
        verdict = _verdicts[settings] = Verdict(tls_problem, accepts, unresolved)
    return verdict


async def _unresolved(bootstrap: str) -> tuple[str, ...]:
    """The bootstrap hosts, when not one of them has an address; else ()."""
    hosts = []
    for server in filter(None, (part.strip() for part in bootstrap.split(","))):
        host = server.rpartition(":")[0].strip("[]") or server
        try:
            with anyio.fail_after(_TCP_PROBE_S):
                await anyio.getaddrinfo(host, None)
        except socket.gaierror:
            hosts.append(host)
        except (OSError, TimeoutError):
            return ()  # a slow or broken resolver: no verdict on the names
        else:
            return ()
    return tuple(hosts)


def connected(settings: KafkaSettings) -> None:
    """A client of `settings` connected: the next connection error is probed afresh."""
    _verdicts.pop(settings, None)


async def _tls_problem(settings: KafkaSettings) -> str | None:
    """Why a TLS handshake with the first bootstrap server fails, if it does (aiokafka only
    says it could not bootstrap)."""
    if not settings.security_protocol.endswith("SSL"):
        return None
    try:
        host, port = _first_server(settings.bootstrap_servers)
        # the context reads the CA and key files: off the event loop
        options = await anyio.to_thread.run_sync(settings.client_options)
        context = options["ssl_context"]
        assert isinstance(context, ssl.SSLContext)
        with anyio.fail_after(_TLS_PROBE_S):
            stream = await anyio.connect_tcp(host, port, ssl_context=context, tls_hostname=host)
            await stream.aclose()
        return None
    except ssl.SSLError as exc:
        return getattr(exc, "verify_message", None) or exc.reason or str(exc)
    except (OSError, ValueError, TimeoutError, anyio.BrokenResourceError):
        return None  # not a TLS problem: the port does not answer


def _first_server(bootstrap: str) -> tuple[str, int]:
    """(host, port) of the first bootstrap server; ValueError when it has no port."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    return host or "127.0.0.1", int(port)


async def _accepts_tcp(bootstrap: str) -> bool:
    try:
        with anyio.fail_after(_TCP_PROBE_S):
            stream = await anyio.connect_tcp(*_first_server(bootstrap))
            await stream.aclose()
        return True
    except (OSError, ValueError, TimeoutError):
        return False


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
    client: Any, settings: KafkaSettings, doing: str, *, timeout_s: float | None = None
) -> None:
    """Start an aiokafka client (consumer, producer or admin). When it cannot start, stop
    it (its sockets and tasks are already open) and raise our `KafkaError`, which says what
    we were `doing`. With `timeout_s`, a start that hangs fails too."""
    if isinstance(client, AIOKafkaProducer) and client._txn_manager is not None:
        ride_out_lost_coordinators(client)
    try:
        with anyio.fail_after(timeout_s):
            await client.start()
    except (AIOKafkaError, OSError, TimeoutError) as exc:
        await stop_client(client)
        raise await translated(exc, settings, doing) from exc
    connected(settings)


async def stop_client(client: Any) -> None:
    """Stop (or, for an admin client, close) an aiokafka client."""
    stop = client.close if isinstance(client, AIOKafkaAdminClient) else client.stop
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
    """A started `AIOKafkaConsumer` that never commits on its own (callers decide when)."""
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
    finally:
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


def quiet_when_fenced(loop: asyncio.AbstractEventLoop) -> None:
    """Fenced, aiokafka fails futures of its own that nobody awaits (a transaction's
    waiter, batches' drain waiters) and asyncio logs each as "never retrieved", tracebacks
    and all, after the one line that says what happened: drop those, pass on everything
    else. Once per loop."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiet_when_fenced", False):
        return

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), ProducerFenced) and "future" in context:
            return
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    handle.quiet_when_fenced = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handle)


def retrieve(future: asyncio.Future[Any]) -> None:
    """A done callback that reads a future's failure (asyncio logs one nobody read)."""
    if not future.cancelled():
        future.exception()
