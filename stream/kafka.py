"""Kafka client construction and error translation, shared by every command.

aiokafka raises its own exception types, and a cluster that is down shows up as a
`KafkaConnectionError` deep inside a start-up call; this module turns those into our
`KafkaError` with a sentence that says what to check.
"""

from __future__ import annotations

import random
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.structs import TopicPartition

from stream.config import KafkaSettings
from stream.errors import ConfigError, KafkaError

__all__ = [
    "admin_client",
    "consumer_client",
    "group_offsets",
    "producer_client",
    "topic_partitions",
    "translate",
]

_COORDINATOR_TRIES = 12  # about 15 s of back-off in all


def translate(exc: BaseException, settings: KafkaSettings, doing: str) -> KafkaError:
    """Our `KafkaError` for a foreign one, saying what we were doing and where."""
    where = settings.bootstrap_servers
    detail = str(exc) or type(exc).__name__
    if "Authentication" in detail or "SaslAuthenticationFailed" in detail:
        return KafkaError(
            f"Kafka at {where} rejected our credentials while {doing}: check "
            "STREAM_KAFKA_SASL_USERNAME, STREAM_KAFKA_SASL_PASSWORD and "
            "STREAM_KAFKA_SASL_MECHANISM"
        )
    tls_problem = _tls_problem(settings) if isinstance(exc, KafkaConnectionError) else None
    if tls_problem:
        return KafkaError(
            f"TLS to Kafka at {where} failed while {doing} ({tls_problem}): check "
            "STREAM_KAFKA_SSL_CAFILE (the CA that signed the broker's certificate), the host "
            "name in KAFKA_BOOTSTRAP_SERVERS, and STREAM_KAFKA_SECURITY_PROTOCOL"
        )
    if isinstance(exc, KafkaConnectionError) and settings.sasl_mechanism and _accepts_tcp(where):
        # aiokafka logs the SASL failure and raises a bare "unable to bootstrap": a port that
        # answers but a client that cannot get in is, in practice, a credentials problem.
        return KafkaError(
            f"Kafka at {where} accepted the connection but rejected our credentials while "
            f"{doing}: check STREAM_KAFKA_SASL_USERNAME, STREAM_KAFKA_SASL_PASSWORD, "
            "STREAM_KAFKA_SASL_MECHANISM and STREAM_KAFKA_SECURITY_PROTOCOL"
        )
    if isinstance(exc, KafkaConnectionError):
        return KafkaError(
            f"cannot reach Kafka at {where} while {doing}: is it running? "
            "(start a local one with `stream kafka start`, or set KAFKA_BOOTSTRAP_SERVERS)"
        )
    name = type(exc).__name__
    if "Authorization" in name:
        return KafkaError(
            f"Kafka at {where} did not allow {doing} ({name}): grant this user ACLs on the "
            "topics, groups and transactional ids (kafka-acls; the README's 'On a secured "
            "cluster' lists them), or use another user"
        )
    return KafkaError(f"Kafka at {where} failed while {doing}: {detail}")


def _tls_problem(settings: KafkaSettings) -> str | None:
    """Why a TLS handshake with the first bootstrap server fails, if it does (aiokafka only
    says it could not bootstrap)."""
    if not settings.security_protocol.endswith("SSL"):
        return None
    context = settings.client_options()["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    try:
        host, port = _first_server(settings.bootstrap_servers)
        with (
            socket.create_connection((host, port), timeout=3.0) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return None
    except ssl.SSLError as exc:
        return getattr(exc, "verify_message", None) or exc.reason or str(exc)
    except (OSError, ValueError):
        return None  # not a TLS problem: the port does not answer


def _first_server(bootstrap: str) -> tuple[str, int]:
    """(host, port) of the first bootstrap server; ValueError when it has no port."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    return host or "127.0.0.1", int(port)


def _accepts_tcp(bootstrap: str) -> bool:
    try:
        with socket.create_connection(_first_server(bootstrap), timeout=1.0):
            return True
    except (OSError, ValueError):
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


@asynccontextmanager
async def admin_client(settings: KafkaSettings, *, doing: str) -> AsyncIterator[Any]:
    """A started admin client (`_AdminClient`); failures to connect become our `KafkaError`."""
    admin = _AdminClient(**settings.client_options())
    try:
        await admin.start()
    except (AIOKafkaError, OSError) as exc:
        await admin.close()
        raise translate(exc, settings, doing) from exc
    try:
        yield admin
    finally:
        await admin.close()


@asynccontextmanager
async def consumer_client(
    settings: KafkaSettings, *, doing: str, **options: Any
) -> AsyncIterator[Any]:
    """A started `AIOKafkaConsumer` that never commits on its own (callers decide when)."""
    consumer = AIOKafkaConsumer(**settings.client_options(), enable_auto_commit=False, **options)
    async with _started(consumer, settings, doing):
        yield consumer


@asynccontextmanager
async def producer_client(settings: KafkaSettings, *, doing: str) -> AsyncIterator[Any]:
    """A started idempotent producer (`acks=all`): a retried send is never written twice."""
    producer = AIOKafkaProducer(**settings.client_options(), enable_idempotence=True, acks="all")
    async with _started(producer, settings, doing):
        yield producer


@asynccontextmanager
async def _started(client: Any, settings: KafkaSettings, doing: str) -> AsyncIterator[None]:
    try:
        await client.start()
    except (AIOKafkaError, OSError) as exc:
        await client.stop()
        raise translate(exc, settings, doing) from exc
    try:
        yield
    finally:
        await client.stop()


async def group_offsets(admin: Any, group: str, tps: list[Any]) -> dict[Any, Any]:
    """The group's committed offsets. On a young cluster the offsets topic is created by the
    first coordinator look-up, which fails until it exists: retry that, for a bounded time."""
    for attempt in range(_COORDINATOR_TRIES):
        try:
            offsets: dict[Any, Any] = await admin.list_consumer_group_offsets(group, partitions=tps)
            return offsets
        except AIOKafkaError as exc:
            if not exc.retriable or attempt == _COORDINATOR_TRIES - 1:
                raise
            await anyio.sleep(0.1 * 2 ** min(attempt, 4))
    raise AssertionError("unreachable")


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
            raise translate(exc, kafka, "reading topics") from exc
    return {
        d["topic"]: sorted(TopicPartition(d["topic"], p["partition"]) for p in d["partitions"])
        for d in described
    }
