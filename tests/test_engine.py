"""The engine against a real broker: throughput shape, errors, flow control, lanes."""

from __future__ import annotations

import collections
import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from aiokafka import TopicPartition

from stream.config import EngineSettings, Settings
from stream.engine.engine import Engine, Output
from stream.engine.offsets import PartitionOffsets
from stream.engine.partitions import Partition
from stream.engine.rebalance import Rebalancer
from stream.engine.transactions import ExactlyOnceSink
from tests.kit import eventually
from tests.kit.kafka import Record, commit, committed, create_topic, end_offsets, produce, read_all
from tests.kit.workers import engine_on

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _with(settings: Settings, **engine: Any) -> Settings:
    fields = {**dataclasses.asdict(settings.engine), "commit_interval_s": 0.2, **engine}
    return dataclasses.replace(settings, engine=EngineSettings(**fields))


def _to_dead_letter(topic: str) -> Any:
    def on_error(record: Any, exc: BaseException) -> Sequence[Output]:
        return [Output(topic, record.value, headers=(("error", type(exc).__name__.encode()),))]

    return on_error


def _engine(
    settings: Settings, group: str, source: str, handler: Any, dead: str, **engine: Any
) -> Engine:
    """An engine on `source` whose handler errors go to `dead` (`engine`: its settings)."""
    return Engine(
        settings=_with(settings, **engine),
        name="t",
        group_id=settings.group(group),
        topics=[source],
        handler=handler,
        on_error=_to_dead_letter(dead),
    )


class Counter:
    """Counts handled records and fires an event at a target."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.seen: list[bytes] = []
        self.reached = anyio.Event()

    def add(self, value: bytes) -> None:
        self.seen.append(value)
        if len(self.seen) >= self.target:
            self.reached.set()


async def test_ten_thousand_records_six_partitions_concurrency_500(settings: Settings) -> None:
    source = await create_topic(settings, "eng-in", 6)
    sink = await create_topic(settings, "eng-out", 3)
    values = [f"r{i}".encode() for i in range(10_000)]
    await produce(settings, source, [Record(v, str(i).encode()) for i, v in enumerate(values)])
    counter = Counter(len(values))
    peak = 0

    async def handler(record: Any) -> Sequence[Output]:
        nonlocal peak
        peak = max(peak, engine.snapshot().in_flight)
        await anyio.sleep(random.uniform(0, 0.05))
        counter.add(record.value)
        return [Output(sink, record.value + b"!", key=record.key)]

    engine = Engine(
        settings=_with(settings, max_in_flight=500, max_in_flight_per_partition=200),
        name="t",
        group_id=settings.group("eng-10k"),
        topics=[source],
        handler=handler,
        on_error=_to_dead_letter(sink),
    )
    ends = await end_offsets(settings, source)

    async def snapshot_says_all_committed() -> bool:
        return {p.partition: p.committed for p in engine.snapshot().partitions} == ends

    async with engine_on(engine, deadline_s=120):
        await counter.reached.wait()
        await eventually(snapshot_says_all_committed)  # within a commit interval (1 s)

    assert sorted(counter.seen) == sorted(values)  # each handled, none twice in a clean run
    outputs = sorted(r.value for r in await read_all(settings, sink))
    assert outputs == sorted(v + b"!" for v in values)
    assert {
        p: o for p, (o, _) in (await committed(settings, engine.group_id, source)).items()
    } == ends
    snap = engine.snapshot()
    assert (snap.records_in, snap.records_done, snap.handler_errors) == (10_000, 10_000, 0)
    assert 200 < peak <= 500  # ran concurrently, within the bound
    assert "done=10000" in repr(engine)


async def test_handler_exception_goes_to_on_error_and_worker_continues(settings: Settings) -> None:
    source = await create_topic(settings, "eng-err", 1)
    sink = await create_topic(settings, "eng-err-out", 1)
    dead = await create_topic(settings, "eng-err-dlq", 1)
    await produce(settings, source, [f"{i}".encode() for i in range(20)])
    counter = Counter(20)

    async def handler(record: Any) -> Sequence[Output]:
        counter.add(record.value)
        if int(record.value) % 5 == 0:
            raise ValueError("bad record")
        return [Output(sink, record.value)]

    engine = _engine(settings, "eng-err", source, handler, dead)
    async with engine_on(engine):
        await counter.reached.wait()

    letters = await read_all(settings, dead)
    assert sorted(int(r.value) for r in letters) == [0, 5, 10, 15]
    assert all(dict(r.headers)["error"] == b"ValueError" for r in letters)
    assert len(await read_all(settings, sink)) == 16
    assert engine.snapshot().handler_errors == 4
    assert (await committed(settings, engine.group_id, source))[0][0] == 20


async def test_an_output_kafka_refuses_for_good_goes_to_on_error_not_round_and_round(
    settings: Settings,
) -> None:
    """At-least-once retries a produce while Kafka is down; an output over its topic's
    max.message.bytes would fail the same way for ever, so the record goes to on_error."""
    source = await create_topic(settings, "eng-big", 1)
    # Over the engine's 256 KB batches, so the big output travels alone (a small one
    # batched with it would be refused with it, and gets tries of its own).
    sink = await create_topic(settings, "eng-big-out", 1, {"max.message.bytes": "300000"})
    dead = await create_topic(settings, "eng-big-dlq", 1)
    await produce(settings, source, [b"small", b"huge", b"after"])
    counter = Counter(3)

    async def handler(record: Any) -> Sequence[Output]:
        counter.add(record.value)
        size = 100_000 if record.value == b"huge" else 10  # 400 KB
        return [Output(sink, record.value * size)]

    engine = _engine(settings, "eng-big", source, handler, dead)
    async with engine_on(engine):
        await counter.reached.wait()

    assert (await committed(settings, engine.group_id, source))[0][0] == 3
    letters = await read_all(settings, dead)
    assert [(r.value, dict(r.headers)["error"]) for r in letters] == [
        (b"huge", b"OutputRejectedError")
    ]
    assert sorted(r.value for r in await read_all(settings, sink)) == [b"after" * 10, b"small" * 10]
    assert engine.snapshot().records_done == 3


async def _until_complete(settings: Settings, sink: str, want: set[bytes]) -> list[Any]:
    while True:
        outputs = await read_all(settings, sink, isolation="read_committed")
        if want <= {r.value for r in outputs}:
            return outputs
        await anyio.sleep(0.3)  # polling a condition, not ordering tasks


async def test_second_worker_joins_mid_run_exactly_once(settings: Settings) -> None:
    source = await create_topic(settings, "eng-join", 4)
    sink = await create_topic(settings, "eng-join-out", 2)
    values = [f"j{i}".encode() for i in range(3000)]
    await produce(settings, source, values)
    group = settings.group("eng-join")
    first_handled = Counter(300)
    # ~3 s of work at 20 in flight; a short session so the rebalance starts within a second.
    config = _with(
        settings,
        guarantee="exactly-once",
        max_in_flight=20,
        max_in_flight_per_partition=10,
        session_timeout_ms=6000,
    )

    def make(name: str, counter: Counter) -> Engine:
        async def handler(record: Any) -> Sequence[Output]:
            await anyio.sleep(random.uniform(0.01, 0.03))
            counter.add(record.value)
            return [Output(sink, record.value)]

        return Engine(
            settings=config,
            name=name,
            group_id=group,
            topics=[source],
            handler=handler,
            on_error=_to_dead_letter(sink),
        )

    first = make("a", first_handled)
    second = make("b", Counter(1))
    async with engine_on(first, deadline_s=120):
        await first_handled.reached.wait()
        async with engine_on(second, deadline_s=120):
            outputs = await _until_complete(settings, sink, set(values))
    assert sorted(r.value for r in outputs) == sorted(values)  # none lost, none twice
    assert second.snapshot().records_done > 0  # the newcomer did take partitions


async def test_full_partition_window_pauses_and_resumes(settings: Settings) -> None:
    source = await create_topic(settings, "eng-pause", 1)
    sink = await create_topic(settings, "eng-pause-out", 1)
    await produce(settings, source, [f"{i}".encode() for i in range(60)])
    release = anyio.Event()
    window_full = anyio.Event()
    counter = Counter(60)

    async def handler(record: Any) -> Sequence[Output]:
        if engine.snapshot().in_flight >= 5:
            window_full.set()
        await release.wait()
        counter.add(record.value)
        return [Output(sink, record.value)]

    engine = Engine(
        settings=_with(settings, max_in_flight=20, max_in_flight_per_partition=5),
        name="t",
        group_id=settings.group("eng-pause"),
        topics=[source],
        handler=handler,
        on_error=_to_dead_letter(sink),
    )
    async with engine_on(engine):
        await window_full.wait()
        (partition,) = engine.snapshot().partitions
        assert partition.in_flight == 5  # the per-partition bound, not the total one
        assert partition.paused  # its queue is full: no more fetching
        assert partition.oldest_in_flight_timestamp_ms is not None
        release.set()
        # A getmany returns at most 20 records (max_in_flight): handling all 60 means the
        # paused partition was resumed as its queue drained.
        await counter.reached.wait()
    assert sorted(int(v) for v in counter.seen) == list(range(60))


async def test_key_ordering_runs_one_key_at_a_time(settings: Settings) -> None:
    source = await create_topic(settings, "eng-key", 1)
    sink = await create_topic(settings, "eng-key-out", 1)
    keys = [f"k{i % 4}".encode() for i in range(200)]
    await produce(settings, source, [Record(f"{i}".encode(), key) for i, key in enumerate(keys)])
    counter = Counter(200)
    running_keys: collections.Counter[bytes] = collections.Counter()
    order: dict[bytes, list[int]] = collections.defaultdict(list)
    overlap_same_key = 0
    peak_keys = 0

    async def handler(record: Any) -> Sequence[Output]:
        nonlocal overlap_same_key, peak_keys
        running_keys[record.key] += 1
        overlap_same_key = max(overlap_same_key, running_keys[record.key])
        peak_keys = max(peak_keys, sum(1 for n in running_keys.values() if n))
        await anyio.sleep(random.uniform(0, 0.01))
        running_keys[record.key] -= 1
        order[record.key].append(record.offset)
        counter.add(record.value)
        return [Output(sink, record.value, key=record.key)]

    engine = Engine(
        settings=_with(settings, ordering="key", max_in_flight=50),
        name="t",
        group_id=settings.group("eng-key"),
        topics=[source],
        handler=handler,
        on_error=_to_dead_letter(sink),
    )
    async with engine_on(engine):
        await counter.reached.wait()
    assert overlap_same_key == 1  # one record per key at a time
    assert peak_keys > 1  # different keys ran side by side
    assert all(offsets == sorted(offsets) for offsets in order.values())


async def test_live_records_complete_before_backfill(settings: Settings) -> None:
    live = await create_topic(settings, "eng-live", 1)
    backfill = await create_topic(settings, "eng-backfill", 1)
    sink = await create_topic(settings, "eng-lane-out", 1)
    await produce(settings, live, [b"live"] * 300)
    await produce(settings, backfill, [b"backfill"] * 300)
    counter = Counter(600)

    async def handler(record: Any) -> Sequence[Output]:
        await anyio.sleep(random.uniform(0, 0.005))
        counter.add(record.value)
        return [Output(sink, record.value)]

    engine = Engine(
        settings=_with(settings, max_in_flight=20, max_in_flight_per_partition=20),
        name="t",
        group_id=settings.group("eng-lane"),
        topics=[live],
        low_priority_topics=[backfill],
        handler=handler,
        on_error=_to_dead_letter(sink),
    )
    async with engine_on(engine):
        await counter.reached.wait()
    last_live = max(i for i, v in enumerate(counter.seen) if v == b"live")
    backfill_before = counter.seen[:last_live].count(b"backfill")
    # Only spare capacity goes to the backfill: a few slip in while live fetches are in
    # transit, a fair scheduler would have interleaved about half (~300).
    assert backfill_before <= 60, backfill_before


async def test_exactly_once_never_commits_offsets_of_outputs_the_broker_rejected(
    settings: Settings,
) -> None:
    from aiokafka.admin import NewTopic

    from stream.errors import KafkaError
    from stream.kafka import admin_client

    live = _with(settings, guarantee="exactly-once")
    source = await create_topic(live, "eos-in", 1)
    sink = live.topic(f"eos-small-{random.randrange(10**9)}")
    async with admin_client(live.kafka, doing="test") as admin:
        # the client accepts 5 kB; this topic's broker-side limit refuses it
        await admin.create_topics(
            [NewTopic(sink, 1, 1, topic_configs={"max.message.bytes": "2000"})]
        )
    await produce(live, source, [b"a", b"b", b"c"])

    async def handler(record: Any) -> Sequence[Output]:
        return [Output(topic=sink, value=b"x" * 5000)]

    engine = Engine(
        settings=live,
        name="eos",
        group_id=live.group("eos-rejected"),
        topics=[source],
        handler=handler,
        on_error=lambda record, exc: [],
    )
    with anyio.fail_after(60), pytest.raises(BaseExceptionGroup) as failed:
        await engine.run()
    assert failed.group_contains(KafkaError)
    assert await committed(live, live.group("eos-rejected"), source) == {}
    assert await read_all(live, sink, isolation="read_committed") == []


async def test_a_failure_while_setting_up_assigned_partitions_stops_the_engine(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream.errors import KafkaError

    topic = await create_topic(settings, "assign-fail", 1)
    engine = Engine(
        settings=settings,
        name="af",
        group_id=settings.group("assign-fail"),
        topics=[topic],
        handler=lambda record: _none(),
        on_error=lambda r, e: [],
    )

    async def broken(self: Rebalancer, tps: Any) -> Any:
        raise KafkaError("the coordinator went away")

    # aiokafka swallows listener errors; the engine must not sit on partitions it never set up
    monkeypatch.setattr(Rebalancer, "committed", broken)
    with anyio.fail_after(60), pytest.raises(BaseExceptionGroup) as failed:
        await engine.run()
    assert failed.group_contains(KafkaError, match="handling a rebalance failed")


async def _none() -> Sequence[Output]:
    return []


async def test_exactly_once_a_run_that_outlived_its_partition_writes_nothing(
    settings: Settings,
) -> None:
    """A handler that shields itself from cancellation can finish after its partition was
    revoked and came back to this worker: its outputs must not ride in the new owner's
    transaction (which never counts that record as finished, so it would run twice)."""
    source = await create_topic(settings, "eos.abandon.in", 1)
    sink_topic = await create_topic(settings, "eos.abandon.out", 1)
    tp = TopicPartition(source, 0)
    sink = ExactlyOnceSink(settings.kafka, settings.group("eos-abandon"), {"linger_ms": 5})
    await sink.assigned([tp])
    try:
        old = Partition(tp, PartitionOffsets(0), low_priority=False, key_ordering=False)
        old.abandon()  # its revoke grace ran out with this record still running
        new = Partition(tp, PartitionOffsets(0), low_priority=False, key_ordering=False)
        assert old.offsets.accept(0) and new.offsets.accept(0)  # fetched by each owner
        assert not await sink.write(old, 0, [Output(sink_topic, b"late")])  # outlived it
        assert await sink.write(new, 0, [Output(sink_topic, b"again")])  # the new owner's run
        assert old.offsets.watermark == 0 and new.offsets.watermark == 1
        await sink.commit([new])
    finally:
        await sink.stop()
    values = [r.value for r in await read_all(settings, sink_topic, isolation="read_committed")]
    assert values == [b"again"]


async def test_a_record_still_running_when_the_drain_runs_out_is_cancelled_not_waited_for(
    settings: Settings,
) -> None:
    """The records of one task follow each other (a finished record's task runs the
    next); abandoning a partition cancels the task running its record: that record's
    handler sees the cancellation, the ones before it are done and committed."""
    source = await create_topic(settings, "eng-abandon", 1)
    sink = await create_topic(settings, "eng-abandon-out", 1)
    dead = await create_topic(settings, "eng-abandon-dlq", 1)
    await produce(settings, source, [f"{i}".encode() for i in range(30)])
    stuck, cancelled = anyio.Event(), anyio.Event()

    async def handler(record: Any) -> Sequence[Output]:
        if record.value == b"29":
            stuck.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()
        return [Output(sink, record.value)]

    engine = _engine(
        settings, "eng-abandon", source, handler, dead, max_in_flight=2, shutdown_grace_s=0.5
    )

    async def the_others_done() -> bool:
        return engine.snapshot().records_done == 29

    async with engine_on(engine):
        with anyio.fail_after(30):
            await stuck.wait()
            await eventually(the_others_done)
    assert cancelled.is_set()
    assert engine.snapshot().abandoned == 1
    assert sorted(int(r.value) for r in await read_all(settings, sink)) == list(range(29))
    assert (await committed(settings, engine.group_id, source))[0][0] == 29


async def test_records_dropped_by_a_stop_at_once_are_counted_as_abandoned(
    settings: Settings,
) -> None:
    """A second signal cancels the drain: the records still running are dropped (their
    next owner runs them again, maybe paying twice) and counted, as a grace run out is."""
    source = await create_topic(settings, "eng-hardstop", 1)
    sink = await create_topic(settings, "eng-hardstop-out", 1)
    dead = await create_topic(settings, "eng-hardstop-dlq", 1)
    await produce(settings, source, [f"{i}".encode() for i in range(5)])
    stuck = 0
    all_stuck = anyio.Event()

    async def handler(record: Any) -> Sequence[Output]:
        nonlocal stuck
        if record.value in (b"2", b"3", b"4"):
            stuck += 1
            if stuck == 3:
                all_stuck.set()
            await anyio.sleep_forever()
        return [Output(sink, record.value)]

    engine = _engine(settings, "eng-hardstop", source, handler, dead, shutdown_grace_s=60)

    async def the_others_done() -> bool:
        return engine.snapshot().records_done == 2

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(engine.run)
            await all_stuck.wait()
            await eventually(the_others_done)
            engine.stop()  # the first signal: drain (up to 60 s)
            group.cancel_scope.cancel()  # the second: at once
    assert engine.snapshot().abandoned == 3


async def test_nothing_starts_after_a_stop(settings: Settings) -> None:
    """A stop that comes while a fetch is out: the records it brings, and those queued,
    stay unstarted (uncommitted, for the next owner), even as the running ones finish
    and make room. Before, the fetch round that was under way started as many as there
    was room for, one last time."""
    source = await create_topic(settings, "eng-nostart", 1)
    dead = await create_topic(settings, "eng-nostart-dlq", 1)
    await produce(settings, source, [f"{i}".encode() for i in range(50)])
    started: list[bytes] = []
    gate, running = anyio.Event(), anyio.Event()

    async def handler(record: Any) -> Sequence[Output]:
        started.append(record.value)
        if len(started) == 5:
            running.set()
        await gate.wait()
        return []  # nothing to write: finished the moment it returns

    engine = _engine(settings, "eng-nostart", source, handler, dead, max_in_flight=5)
    async with engine_on(engine):
        with anyio.fail_after(30):
            await running.wait()
        await anyio.sleep(0.3)  # the fetch loop back in its poll, records queued
        engine.stop()
        gate.set()  # the five finish at once: room for five more
    assert sorted(started) == sorted(f"{i}".encode() for i in range(5))
    assert (await committed(settings, engine.group_id, source))[0][0] == 5


async def test_a_committed_offset_past_the_log_end_is_said_once_per_partition(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka moves a position past the log end back to the log start (a log that lost
    records in an unclean leader election, or an offset set by hand); the records below
    the committed offset are taken as done, as before, but no longer in silence."""
    source = await create_topic(settings, "past-end", 2)
    dead = await create_topic(settings, "past-end-dead", 1)
    await produce(settings, source, [Record(b"%d" % i, partition=i % 2) for i in range(6)])
    group = settings.group("past-end")
    await commit(settings, group, {TopicPartition(source, p): 1000 for p in (0, 1)})
    handled: list[bytes] = []

    async def handler(record: Any) -> Sequence[Output]:
        handled.append(record.value)
        return []

    engine = _engine(settings, "past-end", source, handler, dead)

    async def all_fetched() -> bool:
        return engine.snapshot().records_in == 6

    with caplog.at_level("WARNING", logger="stream.engine.partitions"):
        async with engine_on(engine):
            await eventually(all_fetched)
    said = [r.getMessage() for r in caplog.records if "past the log end" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in said) == [f"{source}[0]", f"{source}[1]"]
    assert "from the committed offset 1000 to 0" in said[0]
    assert handled == []  # nothing paid for again
