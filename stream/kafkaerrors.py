"""What a Kafka failure means to a person: aiokafka's errors as our `KafkaError`, one
sentence that says what to check.

A cluster that is down shows up as a bare "unable to bootstrap" deep inside a start-up
call; what it hides (a certificate the CA did not sign, a port that takes the connection
but lets us not in or never answers, a host name with no address) comes from probing the
first bootstrap server once per failure episode (`probe`, asynchronous, never on the event
loop's time).
"""

from __future__ import annotations

import socket
import ssl
from typing import NamedTuple

import anyio
from aiokafka.errors import (
    InvalidSessionTimeoutError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    UnknownTopicOrPartitionError,
)

from stream.config import KafkaSettings
from stream.errors import KafkaError

__all__ = ["Verdict", "connected", "probe", "translate", "translated"]

_TLS_PROBE_S = 3.0
_TCP_PROBE_S = 1.0
# the same settings can come from a Kafka client properties file (stream.clientconfig)
_OR_FILE = " (or their keys in the --command-config file)"


_SENDER_DIED = "Unexpected error during batch delivery"  # aiokafka's sender, given up


def translate(exc: BaseException, settings: KafkaSettings, doing: str) -> KafkaError:
    """Our `KafkaError` for a foreign one, saying what we were doing and where.

    No I/O: what a bare "unable to bootstrap" hides (a certificate the CA did not sign, a port
    that answers but lets us not in) comes from the last `probe` of these settings, if any.
    Call sites that can await use `translated`, which probes first."""
    where = settings.bootstrap_servers
    if exc.args[:1] == (_SENDER_DIED,) and exc.__cause__ is not None:
        # aiokafka's producer stopped sending on an error of its own; that error is the news
        # (a broker paused past the timeouts ends here as often as in a timeout).
        return translate(exc.__cause__, settings, doing)
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, (KafkaTimeoutError, TimeoutError)):
        return KafkaError(
            f"Kafka at {where} did not answer in time while {doing} ({detail}): is a broker "
            "down, paused or overloaded? Try again once it answers"
        )
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
    if verdict is not None and verdict.accepts_tcp:
        # A port that takes the connection and gives no Kafka answer: a broker paused
        # (SIGSTOP, a long GC), overloaded or still starting, or another service there.
        # "Is it running? Start it" would send the reader the wrong way.
        return KafkaError(
            f"Kafka at {where} accepts connections but did not answer while {doing}: is the "
            "broker still starting, paused or overloaded, or is another service on that "
            "port? (the address comes from --bootstrap-server, else KAFKA_BOOTSTRAP_SERVERS)"
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
    accepts_tcp: bool  # the first server's port takes a TCP connection
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
        accepts = tls_problem is None and await _accepts_tcp(settings.bootstrap_servers)
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
