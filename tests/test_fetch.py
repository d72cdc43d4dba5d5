"""The engine steps over records the Kafka client cannot decode, and loses nothing.

kcat writes header keys that are not UTF-8; aiokafka raises on them inside `getmany`,
after it has already taken records of other partitions. Each such record must reach the
error path once, by its position, and every other record must be handled once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from stream.config import EngineSettings, Settings
from stream.engine.engine import Engine, Output
from stream.errors import UndecodableRecordError
from stream.observe.lagreader import LagReader
from tests.kit import eventually
from tests.kit.kafka import (
    Record,
    commit,
    committed,
    create_topic,
    end_offsets,
    produce,
    produce_batch,
    read_all,
    started,
    zstd_batch,
)
from tests.kit.kcat import kcat_produce, needs_kcat
from tests.kit.workers import engine_on

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, needs_kcat]

BAD_KEY = (b"\xff\xfekey", b"val")


def _settings(settings: Settings, guarantee: str) -> Settings:
    fields = {
        **dataclasses.asdict(settings.engine),
        "commit_interval_s": 0.2,
        "guarantee": guarantee,
    }
    return dataclasses.replace(settings, engine=EngineSettings(**fields))


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_undecodable_records_go_to_the_error_path_and_nothing_is_skipped(
    settings: Settings, guarantee: str
) -> None:
    source = await create_topic(settings, "undec", 3)
    sink = await create_topic(settings, "undec-out", 1)
    bootstrap = settings.kafka.bootstrap_servers
    good = {p: [f"p{p}-{i}".encode() for i in range(80)] for p in range(3)}
    for p in range(3):
        await produce(settings, source, [Record(v, partition=p) for v in good[p][:40]])
    # three in one batch on partition 1 (a batch cannot be read past its first), one on 2
    await kcat_produce(bootstrap, source, 1, [b"{}", b"x", b"y"], headers=[BAD_KEY])
    await kcat_produce(bootstrap, source, 2, [b"{}"], headers=[BAD_KEY, (b"ok", None)])
    for p in range(3):
        await produce(settings, source, [Record(v, partition=p) for v in good[p][40:]])
    expected_errors = {(1, 40), (1, 41), (1, 42), (2, 40)}
    total = 3 * 80 + len(expected_errors)

    def on_error(record: Any, exc: BaseException) -> Sequence[Output]:
        assert isinstance(exc, UndecodableRecordError), exc
        assert f"@{record.offset} " in str(exc) and "not UTF-8" in str(exc)
        return [Output(sink, f"error {record.partition} {record.offset}".encode())]

    engine, copied = await _copy(_settings(settings, guarantee), source, sink, on_error)
    values = sorted(copied)
    errors = {tuple(map(int, v.split()[1:])) for v in values if v.startswith(b"error")}
    assert errors == expected_errors
    assert [v for v in values if not v.startswith(b"error")] == sorted(sum(good.values(), []))
    assert len(values) == total  # each once
    assert engine.snapshot().records_done == total


async def test_lag_reads_past_a_record_the_client_cannot_decode(settings: Settings) -> None:
    """The lag monitor runs inside every worker: a bad record at a group's committed offset
    must leave its age unknown, not crash the worker."""
    topic = await create_topic(settings, "undec-lag", 2)
    await kcat_produce(settings.kafka.bootstrap_servers, topic, 0, [b"{}"], headers=[BAD_KEY])
    await produce(settings, topic, [Record(b"fine", partition=1)])
    group = settings.group("undec-lag")
    await commit(settings, group, {TopicPartition(topic, p): 0 for p in (0, 1)})
    async with LagReader(settings.kafka, fetch_timeout_s=2) as reader:
        [reading] = await reader.read({group: [topic]})
    rows = {p.partition: p for p in reading.partitions}
    assert (rows[0].committed, rows[0].end, rows[1].end) == (0, 1, 1)
    assert rows[0].oldest_timestamp_ms is None  # unknown, not a crash


async def test_a_partition_being_set_up_is_not_read_again_and_again(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart after a crash: the new partition's set-up (its recovery scan) takes a
    while, and the fetch loop runs meanwhile. An undecodable record past the committed
    offset must not send that loop back to the log start, where another one, finished
    long ago, would be reported again at every fetch until set-up ends."""
    source = await create_topic(settings, "undec-setup", 1)
    sink = await create_topic(settings, "undec-setup-out", 1)
    bootstrap = settings.kafka.bootstrap_servers
    await kcat_produce(bootstrap, source, 0, [b"{}"], headers=[BAD_KEY])  # @0, long done
    await produce(settings, source, [Record(f"a{i}".encode(), partition=0) for i in range(10)])
    await kcat_produce(bootstrap, source, 0, [b"{}"], headers=[BAD_KEY])  # @11, new
    await produce(settings, source, [Record(f"b{i}".encode(), partition=0) for i in range(10)])
    # what the scan reads: the previous owner's outputs since its note
    await produce(settings, sink, [Record(b"o" * 200, partition=0)] * 3000)
    group = settings.group("undec-setup")
    since = int(time.time() * 1000) - 60_000
    await commit(settings, group, {TopicPartition(source, 0): 1}, f"~since={since}")

    async def handler(record: Any) -> Sequence[Output]:
        return []

    engine = Engine(
        settings=_settings(settings, "at-least-once"),
        name="t",
        group_id=group,
        topics=[source],
        handler=handler,
        on_error=lambda record, exc: [],
        output_topics=[sink],
    )

    async def finished() -> bool:
        return (await committed(settings, group, source)).get(0, (0, ""))[0] == 22

    with caplog.at_level(logging.WARNING, logger="stream.engine.fetch"):
        async with engine_on(engine, deadline_s=120):
            await eventually(finished, timeout_s=90)
    reported = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert not [m for m in reported if "@0 " in m], reported
    assert [m for m in reported if "@11 " in m]
    assert engine.snapshot().records_done == 21


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_offsets_passed_over_before_an_unreadable_batch_are_no_dead_letters(
    settings: Settings, guarantee: str
) -> None:
    """aiokafka passes over an aborted transaction's records and the markers without moving
    the position: the stand-ins start at the unreadable batch, not at the position (a
    marker was once a dead letter, and so was each record taken back)."""
    source = await create_topic(settings, "passed", 1)
    sink = await create_topic(settings, "passed-out", 1)
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), transactional_id=f"{source}-outbox"
    )
    async with started(producer):
        for values, commit in (([b"k0", b"k1"], True), ([b"back-0", b"back-1", b"back-2"], False)):
            await producer.begin_transaction()
            for value in values:
                await producer.send_and_wait(source, value, partition=0)
            await (producer.commit_transaction() if commit else producer.abort_transaction())
    # committed @0-1, its marker @2, aborted @3-5, its marker @6; then 18 MiB of zeros in
    # a zstd batch of 9 records @7-15 (past the 16 MiB bound), and a good record @16
    await produce_batch(settings, TopicPartition(source, 0), zstd_batch([bytes(2 << 20)] * 9))
    await produce(settings, source, [Record(b"good", partition=0)])

    def on_error(record: Any, exc: BaseException) -> Sequence[Output]:
        return [Output(sink, f"error {record.offset}".encode())]

    _, values = await _copy(_settings(settings, guarantee), source, sink, on_error)
    # records of a partition are handled many at once: the sink's order is not the source's
    expected = [b"k0", b"k1", *(f"error {o}".encode() for o in range(7, 16)), b"good"]
    assert sorted(values) == sorted(expected)


async def _copy(
    settings: Settings,
    source: str,
    sink: str,
    on_error: Callable[[Any, BaseException], Sequence[Output]],
) -> tuple[Engine, list[bytes]]:
    """Run an engine that copies `source` to `sink` (`on_error` writes what it cannot
    read) until it has committed every partition's end; the values in `sink`, in order."""

    async def handler(record: Any) -> Sequence[Output]:
        return [Output(sink, record.value)]

    engine = Engine(
        settings=settings,
        name="t",
        group_id=settings.group(source),
        topics=[source],
        handler=handler,
        on_error=on_error,
    )
    ends = await end_offsets(settings, source)

    async def finished() -> bool:
        done = await committed(settings, engine.group_id, source)
        return {p: offset for p, (offset, _) in done.items()} == ends

    async with engine_on(engine, deadline_s=120):
        await eventually(finished, timeout_s=90)
    exactly_once = settings.engine.guarantee == "exactly-once"
    isolation = "read_committed" if exactly_once else "read_uncommitted"
    copied = await read_all(settings, sink, isolation=isolation)
    return engine, [r.value for r in copied]
