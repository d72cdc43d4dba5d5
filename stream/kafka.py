"""Kafka client construction and error translation, shared by every command.

aiokafka raises its own exception types, and a cluster that is down shows up as a
`KafkaConnectionError` deep inside a start-up call; this module turns those into our
`KafkaError` with a sentence that says what to check.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError
from aiokafka.errors import KafkaError as AIOKafkaError

from stream.config import KafkaSettings
from stream.errors import KafkaError

__all__ = ["admin_client", "translate"]


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
            "topics and consumer groups (kafka-acls), or use another user"
        )
    return KafkaError(f"Kafka at {where} failed while {doing}: {detail}")


def _accepts_tcp(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


@asynccontextmanager
async def admin_client(settings: KafkaSettings, *, doing: str) -> AsyncIterator[Any]:
    """A started `AIOKafkaAdminClient`; failures to connect become our `KafkaError`."""
    admin = AIOKafkaAdminClient(**settings.client_options())
    try:
        await admin.start()
    except (AIOKafkaError, OSError) as exc:
        await admin.close()
        raise translate(exc, settings, doing) from exc
    try:
        yield admin
    finally:
        await admin.close()
