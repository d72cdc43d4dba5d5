"""The engine's failure paths against a real broker: a commit that fails, a write Kafka
never takes, a fatal refusal, a rebalance step that hangs. Each ends in a known state:
clean-up done, partitions released, the problem said out loud."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream.config import EngineSettings, KafkaSettings, Settings
from stream.devtools.broker import LocalBroker, free_port
from stream.engine import MAX_OUTPUT_BYTES, Engine, Output
from stream.engine import engine as engine_module
from stream.engine import outputs as outputs_module
from stream.engine import transactions as transactions_module
from stream.engine.batches import Batches
from stream.engine.membership import Membership
from stream.engine.offsets import PartitionOffsets
from stream.engine.partitions import Partition
from stream.engine.rebalance import Listener, Rebalancer
from stream.engine.transactions import ExactlyOnceSink
from stream.errors import KafkaError
from stream.kafka import admin_client
from stream.observe.health import Health
from tests.kit import ROOT, eventually
from tests.kit.kafka import (
    committed,
    create_topic,
    has_connections,
    produce,
    read_all,
    stall_producer_starts,
)
from tests.kit.workers import engine_on

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _with(settings: Settings, *, request_timeout_ms: int | None = None, **engine: Any) -> Settings:
    fields = {**dataclasses.asdict(settings.engine), **engine}
    kafka = settings.kafka
    if request_timeout_ms is not None:
        kafka = dataclasses.replace(kafka, request_timeout_ms=request_timeout_ms)
    return dataclasses.replace(settings, kafka=kafka, engine=EngineSettings(**fields))


def _fail_on_error(record: Any, exc: BaseException) -> Sequence[Output]:
    raise AssertionError(f"no record should fail here: {exc!r}")


async def _members(settings: Settings, group: str) -> int:
    async with admin_client(settings.kafka, doing="describing a group") as admin:
        (response,) = await admin.describe_consumer_groups([group])
    (described,) = response.to_object()["groups"]
    return len(described["members"])


async def _fence(settings: Settings, transactional_id: str) -> None:
    """Start (and stop) a producer with the same transactional id: the old one is fenced."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, transactional_id=transactional_id
    )
    await producer.start()
    await producer.stop()


async def _sink_of_one_partition(
    live: Settings, name: str
) -> tuple[str, ExactlyOnceSink, Partition]:
    """An output topic `name`-out, and an exactly-once sink that holds the one partition of
    a new topic `name`-in (in group `name`), with that partition's state."""
    source = await create_topic(live, f"{name}-in", 1)
    out = await create_topic(live, f"{name}-out", 1)
    tp = TopicPartition(source, 0)
    sink = ExactlyOnceSink(live.kafka, live.group(name), {"linger_ms": 5})
    await sink.assigned([tp])
    return out, sink, Partition(tp, PartitionOffsets(0), low_priority=False, key_ordering=False)


async def test_a_failed_final_commit_still_closes_the_engine(settings: Settings) -> None:
    """Exactly-once commits run in a task group: its failure arrived as an exception group,
    slipped past `except KafkaError`, and `run()` skipped `_close()` (the partitions stayed
    assigned and their producers open, the member stayed in the group)."""
    live = _with(settings, guarantee="exactly-once", commit_interval_s=3600.0)
    source = await create_topic(live, "fail-commit-in", 1)
    sink = await create_topic(live, "fail-commit-out", 1)
    await produce(live, source, [b"a"])
    group = live.group("fail-commit")
    done = anyio.Event()

    async def handler(record: Any) -> Sequence[Output]:
        done.set()
        return [Output(sink, record.value)]

    engine = Engine(
        settings=live,
        name="fc",
        group_id=group,
        topics=[source],
        handler=handler,
        on_error=_fail_on_error,
    )
    async with engine_on(engine):  # its final commit, on the way out, fails: ProducerFenced
        await done.wait()
        await eventually(_finished(engine, 1))
        # a new owner (a zombie's successor) takes the transactional id over
        tid = ExactlyOnceSink(live.kafka, group, {}).transactional_id(TopicPartition(source, 0))
        await _fence(live, tid)
    assert engine.snapshot().assigned == 0
    assert await _members(live, group) == 0  # it left the group instead of timing out
    assert await read_all(live, sink, isolation="read_committed") == []


def _finished(engine: Engine, count: int) -> Any:
    async def check() -> bool:
        return engine.snapshot().records_done >= count

    return check


async def test_a_revoke_whose_commit_fails_leaves_nothing_to_carry_on_with(
    settings: Settings,
) -> None:
    """Exactly-once: the transaction a revoke commits is fenced. The revoke still returns
    (the group must not wait), and the partition is void: should it come back, it starts
    over from its committed offset instead of carrying on as if its records had landed."""
    live = _with(settings, guarantee="exactly-once")
    source = await create_topic(live, "fail-revoke-in", 1)
    out = await create_topic(live, "fail-revoke-out", 1)
    tp = TopicPartition(source, 0)
    group = live.group("fail-revoke")
    sink = ExactlyOnceSink(live.kafka, group, {"linger_ms": 5})
    await sink.assigned([tp])
    partition = Partition(tp, PartitionOffsets(0), low_priority=False, key_ordering=False)
    partitions = {tp: partition}
    assert partition.offsets.accept(0)
    assert await sink.write(partition, 0, [Output(out, b"x")])
    await _fence(live, sink.transactional_id(tp))

    async def commit(chosen: Any) -> None:
        await sink.commit(list(chosen))

    consumer = AIOKafkaConsumer(bootstrap_servers=live.kafka.bootstrap_servers)
    rebalancer = Rebalancer(
        settings=live,
        consumer=consumer,
        sink=sink,
        partitions=partitions,
        commit=commit,
        low_priority=frozenset(),
        on_assigned=lambda: None,
        membership=Membership(live.kafka, group, None),
    )
    try:
        with anyio.fail_after(60):
            await rebalancer.revoke({tp})  # logs the failed commit, does not raise
        assert partition.abandoned and partition.committed is None  # void, not carried on
        assert not await sink.write(partition, 0, [Output(out, b"y")])  # its producer is gone
    finally:
        await sink.stop()
        await consumer.stop()  # never started, but aiokafka warns of any unclosed consumer
    assert await read_all(live, out, isolation="read_committed") == []


async def test_outputs_sent_after_a_fence_end_in_one_line_not_a_traceback(
    settings: Settings,
) -> None:
    """Exactly-once: a worker paused past its session wakes fenced, and writes. Its
    outputs fail (ProducerFenced), and aborting the transaction of a fenced producer is an
    AssertionError in aiokafka: the worker died with a traceback, the partition not void,
    and each other output's unread failure logged as 'Future exception was never
    retrieved'. It must end in our one-line Kafka error, the partition void."""
    live = _with(settings, guarantee="exactly-once")
    out, sink, partition = await _sink_of_one_partition(live, "fenced-send")
    await _fence(live, sink.transactional_id(partition.tp))
    unread: list[Any] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unread.append(context))
    await sink.start()  # as the engine starts it
    try:
        for offset in range(3):
            assert partition.offsets.accept(offset)
            assert await sink.write(partition, offset, [Output(out, b"x"), Output(out, b"y")])
        with anyio.fail_after(60), pytest.raises(KafkaError, match="committing the transaction"):
            await sink.commit([partition])
        assert partition.abandoned and partition.committed is None  # void: re-run from Kafka
    finally:
        await sink.stop()
        gc.collect()  # what nobody read is logged now
        loop.set_exception_handler(None)
    assert [c for c in unread if "never retrieved" in c.get("message", "")] == []
    assert await read_all(live, out, isolation="read_committed") == []


async def test_an_error_on_revoke_is_kept_for_the_fetch_loop() -> None:
    """aiokafka logs and swallows what a revoke callback raises; the engine must not go on
    as if the partitions had been released."""

    class Failing:
        async def revoke(self, tps: Any) -> None:
            raise KafkaError("the coordinator went away")

    listener = Listener(Failing(), Membership(KafkaSettings(), "g", None))  # type: ignore[arg-type]
    await listener.on_partitions_revoked({TopicPartition("t", 0)})
    with pytest.raises(KafkaError, match="handling a rebalance failed"):
        listener.raise_error()


async def test_at_least_once_stops_on_an_error_retrying_cannot_fix(settings: Settings) -> None:
    """A missing output topic (or missing ACLs) failed the same way on every try: the
    partition stalled for ever while the worker looked healthy."""
    live = _with(settings, request_timeout_ms=2000)
    source = await create_topic(live, "fatal-in", 1)
    await produce(live, source, [b"a"])
    missing = live.topic("no-such-topic")

    async def handler(record: Any) -> Sequence[Output]:
        return [Output(missing, record.value)]

    engine = Engine(
        settings=live,
        name="fatal",
        group_id=live.group("fatal"),
        topics=[source],
        handler=handler,
        on_error=_fail_on_error,
    )
    with anyio.fail_after(120), pytest.raises(BaseExceptionGroup) as failed:
        await engine.run()
    assert failed.group_contains(KafkaError, match="a topic is missing")


async def test_outputs_kafka_does_not_take_make_the_engine_not_ready_until_they_go_through(
    settings: Settings, tmp_path: Path
) -> None:
    """A hung broker (or too few in-sync replicas): the idempotent producer retries inside
    aiokafka, no error reaches the engine, and /readyz stayed green while nothing moved."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("freezes a broker of its own")
    broker = LocalBroker(home=tmp_path / "kafka", port=free_port())
    await anyio.to_thread.run_sync(broker.start)
    try:
        own = _with(settings, commit_interval_s=0.2)
        own = dataclasses.replace(
            own, kafka=dataclasses.replace(own.kafka, bootstrap_servers=broker.bootstrap_servers)
        )
        await _frozen_broker_then_thawed(own, broker)
    finally:
        await anyio.to_thread.run_sync(broker.stop)


async def _frozen_broker_then_thawed(settings: Settings, broker: LocalBroker) -> None:
    source = await create_topic(settings, "hung-in", 1)
    out = await create_topic(settings, "hung-out", 1)
    await produce(settings, source, [b"a"])
    frozen = anyio.Event()

    async def handler(record: Any) -> Sequence[Output]:
        pid = broker.pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the broker hangs as the outputs go out
        frozen.set()
        return [Output(out, record.value)]

    engine = Engine(
        settings=settings,
        name="hung",
        group_id=settings.group("hung"),
        topics=[source],
        handler=handler,
        on_error=_fail_on_error,
    )
    health = Health()
    health.require_engine(engine)

    async def not_ready() -> bool:
        return any("not taken by Kafka" in why for why in health.failing())

    async def ready() -> bool:
        return health.failing() == [] and engine.snapshot().records_done == 1

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(engine.run)
            await frozen.wait()
            try:
                await eventually(not_ready, timeout_s=60)
            finally:
                pid = broker.pid()
                assert pid is not None
                os.kill(pid, signal.SIGCONT)
            await eventually(ready, timeout_s=60)
            engine.stop()
    assert [r.value for r in await read_all(settings, out)] == [b"a"]


async def test_a_producer_that_hangs_on_assignment_fails_within_the_request_timeout(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting the exactly-once producers runs inside aiokafka's rebalance callback: a
    hung start (a transaction coordinator that never answers) held the group for ever. It
    waits as long as a transaction's commit would (60 s; 2 s here), then fails."""
    from stream.engine import transactions

    live = _with(settings, request_timeout_ms=1000)

    async def hang(self: AIOKafkaProducer) -> None:
        await anyio.sleep_forever()

    monkeypatch.setattr(AIOKafkaProducer, "start", hang)
    monkeypatch.setattr(transactions, "_TRANSACTION_TIMEOUT_MS", 2000)
    sink = ExactlyOnceSink(live.kafka, live.group("hang"), {})
    with anyio.fail_after(30), pytest.raises(KafkaError, match="min.insync.replicas"):
        await sink.assigned([TopicPartition(live.topic("any"), 0)])


async def test_an_exactly_once_record_with_an_output_too_large_puts_none_in_its_transaction(
    settings: Settings,
) -> None:
    """Every output of a record is checked before any goes into the transaction's batches:
    one over the producer's limit fails the write with none of its siblings left behind to
    commit without their record (the records before it commit as ever)."""
    out, sink, partition = await _sink_of_one_partition(settings, "eos-large")
    assert partition.offsets.accept(0) and partition.offsets.accept(1)
    huge = Output(out, b"x" * (MAX_OUTPUT_BYTES + 1))
    try:
        assert await sink.write(partition, 0, [Output(out, b"before")])
        with pytest.raises(KafkaError):
            await sink.write(partition, 1, [Output(out, b"sibling"), huge])
        assert await sink.commit([partition]) == 1
    finally:
        await sink.stop()
    written = await read_all(settings, out, isolation="read_committed")
    assert [r.value for r in written] == [b"before"]
    assert (await committed(settings, settings.group("eos-large"), partition.tp.topic))[0][0] == 1


async def test_an_exactly_once_record_finishing_during_a_commit_waits_for_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record finishing while its partition's transaction commits goes into the next
    transaction with its offset: it waits for the commit (the usual write, with no commit
    under way, takes no lock and no loop turn), so no transaction holds outputs whose
    record's offset it does not commit."""
    out, sink, partition = await _sink_of_one_partition(settings, "eos-during")
    for offset in range(3):
        assert partition.offsets.accept(offset)
    committing, go_on = anyio.Event(), anyio.Event()
    commit_transaction = AIOKafkaProducer.commit_transaction

    async def slow_commit(self: AIOKafkaProducer) -> None:
        committing.set()
        await go_on.wait()
        await commit_transaction(self)

    try:
        assert await sink.write(partition, 0, [Output(out, b"first")])
        assert await sink.commit([partition]) == 1
        assert await sink.write(partition, 1, [Output(out, b"second")])  # begins the next
        monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", slow_commit)
        wrote = anyio.Event()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sink.commit, [partition])
            await committing.wait()

            async def write_during() -> None:
                assert await sink.write(partition, 2, [Output(out, b"during")])
                wrote.set()

            tasks.start_soon(write_during)
            await anyio.wait_all_tasks_blocked()
            assert not wrote.is_set() and not partition.offsets.finished(2)
            go_on.set()
        assert wrote.is_set()
        assert await sink.commit([partition]) == 1
    finally:
        await sink.stop()
    written = await read_all(settings, out, isolation="read_committed")
    assert [r.value for r in written] == [b"first", b"second", b"during"]
    assert (await committed(settings, settings.group("eos-during"), partition.tp.topic))[0][0] == 3


async def test_an_exactly_once_write_that_hangs_aborts_its_transaction(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write is shielded (outputs and the finished mark go in together), and was
    unbounded: a send that never returned hung the record, and the revoke behind it. (The
    outputs go into batches the commit hands over: what may wait on Kafka in the write is
    the metadata of the outputs' topic.)"""
    live = _with(settings, request_timeout_ms=1000)
    out, sink, partition = await _sink_of_one_partition(live, "hang-write")
    assert partition.offsets.accept(0) and partition.offsets.accept(1)

    async def hang(self: AIOKafkaProducer, *args: Any, **kwargs: Any) -> Any:
        await anyio.sleep_forever()

    try:
        assert await sink.write(partition, 0, [Output(out, b"first")])
        monkeypatch.setattr(Batches, "knows", lambda self, topic: False)
        monkeypatch.setattr(Batches, "learn", hang)
        with anyio.fail_after(30), pytest.raises(KafkaError, match="transaction is aborted"):
            await sink.write(partition, 1, [Output(out, b"second")])
        monkeypatch.undo()
        assert not await sink.write(partition, 1, [Output(out, b"again")])  # producer gone
    finally:
        await sink.stop()
    assert await read_all(live, out, isolation="read_committed") == []  # "first" aborted too


async def test_a_transaction_aiokafka_left_on_its_own_fails_as_our_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the broker went away mid-transaction aiokafka may leave it by itself, and its
    next offset send raises IllegalOperation, no Kafka error class of its: that escaped
    the commit's clean-up and crashed a draining worker with a traceback."""
    from aiokafka.errors import IllegalOperation

    async def left(self: AIOKafkaProducer, *args: Any, **kwargs: Any) -> Any:
        raise IllegalOperation("Not in the middle of a transaction")

    _, sink, partition = await _sink_of_one_partition(settings, "left")
    assert partition.offsets.accept(0) and partition.offsets.accept(1)
    partition.offsets.finish(0)
    monkeypatch.setattr(AIOKafkaProducer, "send_offsets_to_transaction", left)
    try:
        with pytest.raises(KafkaError, match="committing the transaction"):
            await sink.commit([partition])
        assert partition.abandoned  # void: re-run from Kafka
        assert not await sink.write(partition, 1, [])  # its producer is gone
    finally:
        await sink.stop()


async def _never_called(record: Any) -> Sequence[Output]:
    raise AssertionError("no record is fetched here")


def _aiokafka_tasks() -> list[asyncio.Task[Any]]:
    """Tasks running aiokafka's code: a started client's sender, metadata and fetch loops."""
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and f"{os.sep}aiokafka{os.sep}" in code.co_filename:
            found.append(task)
    return found


def _start_hangs(
    monkeypatch: pytest.MonkeyPatch, module: Any, kind: type, starting: anyio.Event
) -> None:
    """`module`'s `start_client` hangs for clients of `kind` (saying so), as a start that
    waits on Kafka does; it starts the others."""
    real_start = module.start_client

    async def hangs(client: Any, kafka: KafkaSettings, doing: str, **options: Any) -> None:
        if isinstance(client, kind):
            starting.set()
            await anyio.sleep_forever()
        await real_start(client, kafka, doing, **options)

    monkeypatch.setattr(module, "start_client", hangs)


def _idle_engine(settings: Settings, source: str, name: str) -> Engine:
    return Engine(
        settings=settings,
        name=name,
        group_id=settings.group(name),
        topics=[source],
        handler=_never_called,
        on_error=_fail_on_error,
    )


async def test_an_engine_cancelled_while_its_consumer_starts_leaves_no_client_running(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal during start-up cancels `run` before it has clean-up to reach: the sink's
    producer, already started, must be stopped on the way out all the same."""
    source = await create_topic(settings, "cancel-start-in", 1)
    consumer_starting = anyio.Event()
    _start_hangs(monkeypatch, engine_module, AIOKafkaConsumer, consumer_starting)
    engine = _idle_engine(settings, source, "cancel-start")
    before = _aiokafka_tasks()
    async with anyio.create_task_group() as group:
        group.start_soon(engine.run)
        with anyio.fail_after(30):
            await consumer_starting.wait()
        assert len(_aiokafka_tasks()) > len(before)  # the producer is up
        group.cancel_scope.cancel()
    assert [t for t in _aiokafka_tasks() if not t.done()] == before


_SILENT_MEMBER = """
import asyncio, dataclasses, os, signal, sys
from stream.config import Settings
from stream.engine.assignor import Claims
from stream.engine.clients import make_consumer

async def main() -> None:
    topic, group = sys.argv[1:3]
    settings = Settings.from_env()
    engine = dataclasses.replace(
        settings.engine, session_timeout_ms=60_000, rebalance_timeout_ms=60_000
    )
    settings = dataclasses.replace(settings, engine=engine)
    consumer = make_consumer(settings, group, None, lambda: Claims(generation=-1, owned={}))
    consumer.subscribe([topic])
    await consumer.start()  # returns once it has its assignment
    print("joined", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # silent: its session outlives the test

asyncio.run(main())
"""


async def _group_state(settings: Settings, group: str) -> str:
    async with admin_client(settings.kafka, doing="describing a group") as admin:
        (response,) = await admin.describe_consumer_groups([group])
    (described,) = response.to_object()["groups"]
    return str(described["state"])


async def test_a_stop_while_the_group_waits_for_a_silent_member_ends_the_engine(
    settings: Settings, env: dict[str, str]
) -> None:
    """aiokafka's consumer `start` waits for the first assignment without a deadline; a
    rebalance waiting for a member that went silent (its session still running) held a
    SIGTERM'd worker for as long, and for ever once Kafka went away meanwhile."""
    source = await create_topic(settings, "silent-in", 1)
    group = settings.group("silent")
    silent = await anyio.open_process(
        [sys.executable, "-c", _SILENT_MEMBER, source, group],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert silent.stdout is not None
        with anyio.fail_after(30):
            assert b"joined" in await silent.stdout.receive()
        engine = Engine(
            settings=settings,
            name="late",
            group_id=group,
            topics=[source],
            handler=_never_called,
            on_error=_fail_on_error,
        )

        async def rebalancing() -> bool:
            return await _group_state(settings, group) == "PreparingRebalance"

        ended = anyio.Event()

        async def run() -> None:
            await engine.run()
            ended.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run)
            await eventually(rebalancing)  # our engine's join waits for the silent one
            engine.stop()
            # At once: not the silent member's 60 s session, nor a 10 s wait for the join
            # to end on the way out (an engine without partitions has nothing to hand over).
            with anyio.fail_after(6):
                await ended.wait()
        assert not engine.ready.is_set()
    finally:
        silent.kill()
        await silent.wait()


async def test_a_stop_while_the_producer_starts_ends_the_engine_and_leaves_no_client(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idempotent producer asks Kafka for its id until it answers: a broker that stopped
    answering after the topic check held a SIGTERM'd worker in start-up."""
    source = await create_topic(settings, "stop-producer-in", 1)
    producer_starting = anyio.Event()
    _start_hangs(monkeypatch, outputs_module, AIOKafkaProducer, producer_starting)
    engine = _idle_engine(settings, source, "stop-producer")
    before = _aiokafka_tasks()
    with anyio.fail_after(15):
        async with anyio.create_task_group() as group:
            group.start_soon(engine.run)
            await producer_starting.wait()
            engine.stop()
    assert not engine.ready.is_set()
    assert [t for t in _aiokafka_tasks() if not t.done()] == before


async def test_a_partition_producer_cancelled_while_it_starts_is_stopped(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop or a revoke that cancels an exactly-once partition's producer while it starts
    (a worker joining then) left it unstopped: not yet in the sink's list, its connections
    stayed open until the collector found them, and failed whichever test it ran in."""
    source = await create_topic(settings, "eos-cancel-in", 1)
    made = _record_producers(monkeypatch, transactions_module)
    waiting = stall_producer_starts(monkeypatch)
    sink = ExactlyOnceSink(settings.kafka, settings.group("eos-cancel"), {})
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(sink.assigned, [TopicPartition(source, 0)])
        await waiting.wait()
        [producer] = made
        assert has_connections(producer)
        tasks.cancel_scope.cancel()
    await sink.stop()
    assert not has_connections(producer)


async def test_a_renewed_output_producer_cancelled_while_it_starts_is_stopped(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for the at-least-once sink's producer renewed after a refused batch."""
    made = _record_producers(monkeypatch, outputs_module)
    sink = outputs_module.AtLeastOnceSink(settings.kafka, consumer=None, producer_options={})
    await sink.start()
    waiting = stall_producer_starts(monkeypatch)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sink._renew, made[0], "a test")
            await waiting.wait()
            fresh = made[1]
            assert has_connections(fresh)
            tasks.cancel_scope.cancel()
    finally:
        await sink.stop()
    assert not has_connections(fresh)


def _record_producers(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[AIOKafkaProducer]:
    """Every producer `module` makes from now on, in order."""
    made: list[AIOKafkaProducer] = []

    class Recorded(AIOKafkaProducer):  # type: ignore[misc]
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            made.append(self)

    monkeypatch.setattr(module, "AIOKafkaProducer", Recorded)
    return made
