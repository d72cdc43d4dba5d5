"""Error translation: the probes behind a bare "unable to bootstrap" never block the event
loop and run once per failure episode (the words themselves: tests/test_security.py)."""

from __future__ import annotations

import asyncio
import ssl
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiokafka.errors
import anyio
import anyio.abc
import pytest
import trustme
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import CoordinationType
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    NodeNotReadyError,
)
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.structs import OffsetAndMetadata
from hypothesis import given
from hypothesis import strategies as st

from stream.config import KafkaSettings, Secret, Settings
from stream.errors import KafkaError
from stream.kafka import (
    connected,
    retrying,
    start_client,
    stop_client,
    transient,
    translate,
    translated,
)
from tests.kit import eventually
from tests.kit.kafka import (
    committed,
    create_topic,
    has_connections,
    read_all,
    stall_producer_starts,
)

pytestmark = pytest.mark.anyio


async def test_probing_a_secured_cluster_that_hangs_never_stalls_the_loop_and_runs_once(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    accepted = 0

    async def hang(stream: anyio.abc.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        async with stream:
            await anyio.sleep_forever()  # accepts, never answers a TLS hello

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        settings = KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{port}",
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="u",
            sasl_password=Secret("p"),
            ssl_cafile=str(tmp_path / "ca.pem"),
        )
        longest_gap = 0.0

        async def tick() -> None:
            nonlocal longest_gap
            last = time.monotonic()
            while True:
                await anyio.sleep(0.01)
                now = time.monotonic()
                longest_gap, last = max(longest_gap, now - last), now

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, hang)
            tg.start_soon(tick)
            first = await translated(KafkaConnectionError(), settings, "reading consumer lag")
            probes = accepted
            again = await translated(KafkaConnectionError(), settings, "reading consumer lag")
            unchanged = accepted
            connected(settings)  # a client got through: the next failure is probed afresh
            await translated(KafkaConnectionError(), settings, "reading consumer lag")
            tg.cancel_scope.cancel()

    # the TLS probe waited out its 3 s on a handshake that never came, off the loop
    assert longest_gap < 1.5, f"the event loop stalled for {longest_gap:.1f} s"
    assert probes == 2 and unchanged == 2 and accepted == 4  # TLS + TCP, once per episode
    assert str(first) == str(again)
    assert "accepted the connection but rejected our credentials" in str(first)


def test_without_a_probe_a_connection_error_is_plain_unreachable() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", sasl_mechanism="PLAIN")
    error = translate(KafkaConnectionError(), settings, "starting the consumer")
    assert str(error).startswith("cannot reach Kafka at 127.0.0.1:1 while starting the consumer")
    # a broker gone for a while: the client has no connection to it any more
    lost = translate(NodeNotReadyError("node 1 is not ready"), settings, "reading consumer lag")
    assert str(lost).startswith("cannot reach Kafka at 127.0.0.1:1 while reading consumer lag")
    # one broker of a cluster: the others answer, so it is not "is it running?"
    cluster = KafkaSettings(bootstrap_servers="127.0.0.1:1,127.0.0.1:2")
    one = translate(NodeNotReadyError("node 2 is not ready"), cluster, "reading consumer lag")
    assert "cannot reach a broker of Kafka" in str(one) and "node 2 is not ready" in str(one)
    assert "is it running" not in str(one) and "stream kafka start" not in str(one)


def test_a_kafka_that_stops_answering_reads_the_same_however_aiokafka_says_it() -> None:
    """A broker paused past the clients' timeouts ends a command in a timeout, or in
    aiokafka's producer giving up ("Unexpected error during batch delivery", the timeout
    as its cause): one line for both, naming what to look at."""
    settings = KafkaSettings(bootstrap_servers="10.0.0.7:9092")
    sender = aiokafka.errors.KafkaError("Unexpected error during batch delivery")
    sender.__cause__ = aiokafka.errors.KafkaTimeoutError()
    lines = {
        str(translate(exc, settings, "copying records"))
        for exc in (aiokafka.errors.KafkaTimeoutError(), TimeoutError(), sender)
    }
    assert {line.split(" (")[0] for line in lines} == {
        "Kafka at 10.0.0.7:9092 did not answer in time while copying records"
    }
    assert all(
        line.endswith("is a broker down, paused or overloaded? Try again once it answers")
        for line in lines
    )
    # with another cause, the cause is what the line tells
    sender.__cause__ = aiokafka.errors.UnknownTopicOrPartitionError()
    assert "a topic is missing" in str(translate(sender, settings, "copying records"))


async def test_retrying_rides_out_what_kafka_says_to_retry_and_no_more() -> None:
    calls = 0

    async def young_cluster() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise GroupCoordinatorNotAvailableError("no coordinator yet")
        return "offsets"

    assert await retrying(young_cluster, tries=3) == "offsets"
    assert calls == 3

    calls = 0
    with pytest.raises(GroupCoordinatorNotAvailableError):
        await retrying(young_cluster, tries=2)  # the tries run out first
    assert calls == 2

    async def refused() -> str:
        nonlocal calls
        calls += 1
        raise GroupAuthorizationFailedError("not allowed")

    calls = 0
    with pytest.raises(GroupAuthorizationFailedError):
        await retrying(refused)  # not retriable: raised at once
    assert calls == 1


_AIOKAFKA_ERRORS = sorted(
    (
        kind
        for kind in vars(aiokafka.errors).values()
        if isinstance(kind, type) and issubclass(kind, AIOKafkaError)
    ),
    key=lambda kind: kind.__name__,
)


@given(st.sampled_from(_AIOKAFKA_ERRORS), st.integers(min_value=0, max_value=3))
def test_a_kafka_error_is_transient_exactly_when_what_it_translates_is_retriable(
    kind: type[AIOKafkaError], depth: int
) -> None:
    exc: BaseException = kind()
    for level in range(depth):  # translated, perhaps more than once, always `from` it
        outer = KafkaError(f"failed at level {level}")
        outer.__cause__ = exc
        exc = outer
    assert transient(exc) is bool(kind.retriable)


def test_a_connection_lost_is_transient_and_tls_or_our_own_words_are_not() -> None:
    def ours(cause: BaseException | None) -> KafkaError:
        exc = KafkaError("reading consumer lag failed")
        exc.__cause__ = cause
        return exc

    assert transient(ours(ConnectionResetError()))
    assert transient(ours(NodeNotReadyError("node 2 is not ready")))
    assert not transient(ours(ssl.SSLError("certificate verify failed")))
    assert not transient(ours(None))  # nothing Kafka said: no reason to think it will pass
    assert not transient(ours(GroupAuthorizationFailedError("not allowed")))


async def test_a_transaction_whose_coordinators_left_the_metadata_finds_them_again(
    settings: Settings,
) -> None:
    """A transactional producer keeps its coordinators. On a cluster, a killed broker is
    fenced and leaves the metadata: a coordinator cached on it is then no broker at all.
    aiokafka 0.14 takes that as a refused connection and looks the coordinator up again
    (older releases retried the gone node until it came back, aio-libs/aiokafka#1134 and
    #1145); an exactly-once worker and replay and redrive rely on it. The cluster leaves
    that state only at times, between two tries; here it is set at once."""
    topic = await create_topic(settings, "lost.coordinator", 1)
    group = settings.group("lost-coordinator")
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), transactional_id=settings.topic("lost-coordinator")
    )
    await producer.start()
    try:
        gone = 4242
        assert producer.client.cluster.broker_metadata(gone) is None
        coordinators = producer._sender._coordinators
        coordinators[CoordinationType.TRANSACTION] = coordinators[CoordinationType.GROUP] = gone
        with anyio.fail_after(30):
            async with producer.transaction():
                await producer.send_and_wait(topic, b"answer")
                offsets = {TopicPartition(topic, 0): OffsetAndMetadata(7, "")}
                await producer.send_offsets_to_transaction(offsets, group)
        assert gone not in coordinators.values()
    finally:
        await producer.stop()

    async def seen() -> bool:  # a plain read may come before the commit's markers land
        return (await committed(settings, group, topic)).get(0, (None,))[0] == 7

    await eventually(seen)
    values = [r.value for r in await read_all(settings, topic, isolation="read_committed")]
    assert values == [b"answer"]


async def test_a_transaction_whose_coordinator_lookup_loses_its_connection_commits(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker killed while a FindCoordinator to it is out closes the connection under
    the lookup. aiokafka 0.14 takes that for an unexpected error and ends the producer's
    sender (an exactly-once worker stopped, in CI, with two of three brokers killed):
    our producers look again, as for a coordinator not available. The lookup's connection
    closing is set at once here: the first lookup of the group's coordinator fails so."""
    topic = await create_topic(settings, "lookup.lost", 1)
    group = settings.group("lookup-lost")
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), transactional_id=settings.topic("lookup-lost")
    )
    await start_client(producer, settings.kafka, "starting a transactional producer")
    lookup = producer.client.coordinator_lookup
    lost: list[Any] = []

    async def closes_once(coordinator_type: Any, key: str) -> Any:
        if coordinator_type == CoordinationType.GROUP and not lost:
            lost.append(key)
            raise KafkaConnectionError("Connection at 127.0.0.1:1 closed")
        return await lookup(coordinator_type, key)

    monkeypatch.setattr(producer.client, "coordinator_lookup", closes_once)
    try:
        with anyio.fail_after(30):
            async with producer.transaction():
                await producer.send_and_wait(topic, b"answer")
                offsets = {TopicPartition(topic, 0): OffsetAndMetadata(5, "")}
                await producer.send_offsets_to_transaction(offsets, group)
    finally:
        await producer.stop()
    assert lost == [group]
    assert (await committed(settings, group, topic))[0][0] == 5
    values = [r.value for r in await read_all(settings, topic, isolation="read_committed")]
    assert values == [b"answer"]


async def test_a_stable_read_right_after_a_transaction_commits_sees_its_offsets(
    settings: Settings,
) -> None:
    """A transaction's offsets reach the group a few milliseconds after `commit_transaction`
    returns; OffsetFetch v3 read the offsets before them (35 reads in 40, in a helper's
    probe), and an exactly-once worker reading its own last commit in a rebalance took it
    for another owner's, abandoning running calls to pay for them again. The stable read
    (v7, `require_stable`) waits for them: each read after each commit sees that commit."""
    from functools import partial

    from stream.kafka import admin_client, retrying
    from stream.kafkawire import fetch_offsets

    topic = await create_topic(settings, "stable.read", 1)
    tp = TopicPartition(topic, 0)
    group = settings.group("stable-read")
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), transactional_id=settings.topic("stable-read")
    )
    await start_client(producer, settings.kafka, "starting a transactional producer")
    try:
        async with admin_client(settings.kafka, doing="reading offsets") as admin:
            node = await admin.find_coordinator(group)

            async def send(request: Any) -> Any:
                return await admin._send_request(request, node)

            read = partial(fetch_offsets, send, group, [tp], stable=True)
            seen = []
            for offset in range(1, 21):
                async with producer.transaction():
                    await producer.send_offsets_to_transaction(
                        {tp: OffsetAndMetadata(offset, f"n={offset}")}, group
                    )
                found = (await retrying(read, tries=50))[tp]
                seen.append((found.offset, found.metadata))
    finally:
        await producer.stop()
    assert seen == [(offset, f"n={offset}") for offset in range(1, 21)]


async def test_a_port_that_takes_the_connection_and_never_answers_is_not_told_to_start() -> None:
    """A broker paused (SIGSTOP) still takes connections (the kernel accepts them): the line
    says it accepts and does not answer, not "is it running? start it"."""

    async def silent(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                while await stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=1500)
        async with anyio.create_task_group() as group:
            group.start_soon(listener.serve, silent)
            producer = AIOKafkaProducer(**settings.client_options())
            with pytest.raises(KafkaError) as raised:
                await start_client(producer, settings, "starting the producer")
            group.cancel_scope.cancel()
    assert str(raised.value).startswith(
        f"Kafka at 127.0.0.1:{port} accepts connections but did not answer while starting "
        "the producer: is the broker still starting, paused or overloaded"
    )
    assert "stream kafka start" not in str(raised.value)


class GroupCoordinator:  # named as aiokafka's: its commit request is what is left behind
    async def _do_commit_offsets(self) -> None:
        await asyncio.sleep(0.05)
        raise aiokafka.errors.RequestTimedOutError()


async def test_a_commit_given_up_on_leaves_no_traceback_and_other_failures_still_show() -> None:
    """The engine gives up waiting for a commit when Kafka is paused (its own line says
    so); aiokafka's shielded request fails later, unread (Python 3.11's `shield` drops it
    once the outer await is cancelled), and asyncio logged it with a traceback."""
    import gc

    from stream.kafka import quiet_unread_kafka_failures

    loop = asyncio.get_running_loop()
    shown: list[dict[str, Any]] = []
    before = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: shown.append(context))
    try:
        quiet_unread_kafka_failures(loop)
        with anyio.move_on_after(0.01):  # the engine's deadline on its commit
            await asyncio.shield(GroupCoordinator()._do_commit_offsets())

        async def other() -> None:
            raise aiokafka.errors.RequestTimedOutError()

        task = asyncio.ensure_future(other())  # a failure nobody reads, of another kind
        await asyncio.sleep(0.2)
        del task
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(before)
    names = [c["future"].get_coro().__qualname__ for c in shown if "future" in c]
    assert names == [
        "test_a_commit_given_up_on_leaves_no_traceback_and_other_failures_still_show.<locals>.other"
    ]


@pytest.mark.kafka
@pytest.mark.parametrize("stop_if_cancelled", [True, False])
async def test_a_client_cancelled_while_it_starts_is_stopped_unless_the_caller_stops_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, stop_if_cancelled: bool
) -> None:
    """A start cut short (Ctrl-C as `replay` starts, a revoke, a bounded wait) left what it
    had opened open, for the collector to find: stopped now, unless the caller says it
    stops the client itself (the engine's consumer)."""
    producer = AIOKafkaProducer(**settings.kafka.producer_options(), enable_idempotence=True)
    waiting = stall_producer_starts(monkeypatch)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(
                partial(start_client, stop_if_cancelled=stop_if_cancelled),
                producer,
                settings.kafka,
                "testing",
            )
            await waiting.wait()
            assert has_connections(producer)
            tasks.cancel_scope.cancel()
        left_open = has_connections(producer)
        assert left_open is not stop_if_cancelled
    finally:
        await producer.stop()


async def test_a_consumer_without_a_group_stopped_as_it_starts_stops_without_a_cancel(
    settings: Settings,
) -> None:
    """aiokafka's group-less consumer, stopped before its own task took a step, raised
    CancelledError out of its stop: a failure right after a start (`stream lag` asking the
    cluster's id) passed for a cancellation, a traceback where one line belonged."""
    consumer = AIOKafkaConsumer(**settings.kafka.client_options(), group_id=None)
    await consumer.start()
    await stop_client(consumer)  # would raise asyncio.CancelledError
    assert consumer._closed
