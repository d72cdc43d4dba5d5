"""Finding, by their outputs, the records a dead owner finished after its last commit
(`stream.engine.recovery`): the header, the `since` note, which commits are due, and the
scan against the broker. The whole story (SIGKILL, restart, no output twice) is
`tests/test_engine_crash.py`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from stream.config import Settings
from stream.engine.engine import Engine, Output
from stream.engine.offsets import PartitionOffsets, split_notes, with_notes
from stream.engine.outputs import AtLeastOnceSink
from stream.engine.partitions import Partition
from stream.engine.recovery import (
    HEADER,
    SINCE_REFRESH_S,
    Unfinished,
    _Found,
    _parse,
    commit_positions,
    input_headers,
    recover,
    since_ms,
)
from tests.kit.kafka import Record, commit, committed, create_topic, produce, read_all
from tests.kit.kcat import kcat_produce, needs_kcat
from tests.kit.workers import engine_on

TP = TopicPartition("t.requests", 3)


@given(
    topic=st.from_regex(r"[A-Za-z0-9._-]{1,60}", fullmatch=True),
    partition=st.integers(0, 10_000),
    offset=st.integers(0, 2**62),
    count=st.integers(1, 20),
)
def test_a_header_names_its_record_and_share(
    topic: str, partition: int, offset: int, count: int
) -> None:
    tp = TopicPartition(topic, partition)
    headers = input_headers(tp, offset, count)
    assert [key for key, _ in headers] == [HEADER] * count
    assert [_parse(value) for _, value in headers] == [
        (tp, offset, index, count) for index in range(count)
    ]


@pytest.mark.parametrize(
    "value", [b"", b"t:1:2", b"t:x:2:0/1", b"t:1:2:1/1", b"t:1:2:0/0", b"\xff:1:2:0/1", b"t:1:2:a"]
)
def test_a_header_not_ours_is_ignored(value: bytes) -> None:
    assert _parse(value) is None


def test_a_record_is_finished_when_every_one_of_its_outputs_is_seen() -> None:
    found = _Found({TP: Unfinished(watermark=10, since=0)})
    other = TopicPartition("t.requests", 4)
    for headers in (
        input_headers(TP, 10, 1),  # one of one
        input_headers(TP, 11, 2)[:1],  # one of two: runs again
        input_headers(TP, 12, 2)[::-1],  # two of two, in any order
        input_headers(TP, 9, 1),  # below the watermark: finished already
        input_headers(other, 13, 1),  # another partition's
        [("request-id", b"t.requests:3:14:0/1")],  # another header
        input_headers(TP, 15, 1) + input_headers(TP, 15, 1),  # written twice: still one of one
    ):
        found.note(headers)
    # a re-run that made three outputs where the first made two: either count complete counts
    found.note(input_headers(TP, 16, 2)[:1] + input_headers(TP, 16, 3))
    assert found.finished() == {TP: {10, 12, 15, 16}}


def test_since_is_the_oldest_write_in_progress_else_now() -> None:
    assert since_ms([], now=1000.0, now_monotonic=50.0) == 1_000_000
    assert since_ms([47.5, 49.0], now=1000.0, now_monotonic=50.0) == 997_500


def _partition(committed: int = 100) -> Partition:
    partition = Partition(TP, PartitionOffsets(committed), low_priority=False, key_ordering=False)
    return partition


def test_commits_carry_since_and_a_clean_leave_drops_it() -> None:
    partition = _partition()
    due = commit_positions([partition], now=1000.0, now_monotonic=50.0)
    (base, full) = due[partition]
    assert split_notes(full[1])[1]["since"] == "1000000" and "since" not in base[1]
    partition.committed, partition.committed_base, partition.committed_at = full, base, 50.0
    assert commit_positions([partition], now=1001.0, now_monotonic=51.0) == {}  # nothing moved

    partition.revoked = True  # leaving, no write in progress: its next owner need not look
    (base, full) = commit_positions([partition], now=1002.0, now_monotonic=52.0)[partition]
    assert full == base
    partition.committed = partition.committed_base = base
    assert commit_positions([partition], now=1003.0, now_monotonic=53.0) == {}

    partition.revoked = False  # it came back: the note again, before any output is written
    (_, full) = commit_positions([partition], now=1004.0, now_monotonic=54.0)[partition]
    assert split_notes(full[1])[1]["since"] == "1004000"


def test_an_idle_partition_refreshes_its_note_and_a_write_in_progress_holds_it_back() -> None:
    partition = _partition()
    (base, full) = commit_positions([partition], now=1000.0, now_monotonic=50.0)[partition]
    partition.committed, partition.committed_base, partition.committed_at = full, base, 50.0
    later = 50.0 + SINCE_REFRESH_S
    (_, full) = commit_positions([partition], now=1000.0 + SINCE_REFRESH_S, now_monotonic=later)[
        partition
    ]
    assert split_notes(full[1])[1]["since"] == str(int((1000.0 + SINCE_REFRESH_S) * 1000))

    partition.revoked = True
    partition.writes[120] = later - 2.0  # an output sent 2 s ago, not acknowledged yet
    (_, full) = commit_positions([partition], now=2000.0, now_monotonic=later)[partition]
    assert split_notes(full[1])[1]["since"] == "1998000"  # not clean: it may land after


Due = tuple[tuple[int, str], tuple[int, str]]


def _committed(partition: Partition, due: Due, at: float) -> str:
    """Take a due commit as made; its notes."""
    (base, full) = due
    partition.committed, partition.committed_base, partition.committed_at = full, base, at
    return ",".join(sorted(split_notes(full[1])[1]))


def test_outputs_placed_by_their_key_make_the_note_say_spread_while_the_owner_holds_it() -> None:
    partition = _partition()
    assert _committed(partition, commit_positions([partition], 1000.0, 50.0)[partition], 50.0) == (
        "since"
    )
    partition.spread = True  # an unkeyed request's result went where its id hashes
    due = commit_positions([partition], 1001.0, 51.0)  # nothing moved, but the note must
    assert _committed(partition, due[partition], 51.0) == "since,spread"
    assert commit_positions([partition], 1002.0, 52.0) == {}  # said already

    # Long after: the next such output may come any time, and must be covered when it does.
    later = 50.5 + 10 * SINCE_REFRESH_S
    due = commit_positions([partition], 1000.0 + later - 50.0, later)
    assert _committed(partition, due[partition], later) == "since,spread"

    partition.revoked = True  # a clean leave needs no note at all
    due = commit_positions([partition], 2000.0 + later, later + 1)
    assert _committed(partition, due[partition], 0.0) == ""


@pytest.mark.anyio
@pytest.mark.kafka
async def test_a_spread_note_makes_the_scan_read_every_partition(settings: Settings) -> None:
    source = await create_topic(settings, "rec-in-spread", 3)
    same = await create_topic(settings, "rec-out-spread", 3)
    tp = TopicPartition(source, 1)
    # placed by their keys' hash, not at partition 1
    await produce(
        settings,
        same,
        [
            Record(b"a", partition=0, headers=input_headers(tp, 5, 1)),
            Record(b"b", partition=2, headers=input_headers(tp, 6, 1)),
            Record(b"c", partition=1, headers=input_headers(tp, 7, 1)),
        ],
    )
    since = int(time.time() * 1000) - 60_000
    assert await recover(settings.kafka, {tp: Unfinished(3, since)}, [same]) == {tp: {7}}
    found = await recover(settings.kafka, {tp: Unfinished(3, since, spread=True)}, [same])
    assert found == {tp: {5, 6, 7}}


@pytest.mark.anyio
@pytest.mark.kafka
async def test_the_scan_finds_outputs_in_their_partition_or_anywhere(settings: Settings) -> None:
    source = await create_topic(settings, "rec-in", 3)
    same = await create_topic(settings, "rec-out", 3)  # co-partitioned: only partition 1
    other = await create_topic(settings, "rec-dead", 2)  # not: every partition
    tp = TopicPartition(source, 1)
    now_ms = int(time.time() * 1000)
    await produce(
        settings,
        same,
        [
            # sent long before the previous owner's `since`: not read
            Record(
                b"e", partition=1, headers=input_headers(tp, 8, 1), timestamp_ms=now_ms - 600_000
            ),
            Record(b"a", partition=1, headers=input_headers(tp, 5, 1)),
            Record(b"b", partition=1, headers=input_headers(tp, 6, 2)[:1]),
            Record(b"c", partition=1, headers=[(HEADER, b"garbage")]),
            # in another partition than its input's: not looked at
            Record(b"d", partition=0, headers=input_headers(tp, 7, 1)),
        ],
    )
    await produce(
        settings,
        other,
        [
            Record(b"f", partition=0, headers=input_headers(tp, 6, 2)[1:]),
            Record(b"g", partition=1, headers=input_headers(tp, 9, 1)),
            Record(b"h", partition=1, headers=input_headers(tp, 2, 1)),  # below the watermark
        ],
    )
    wanted = {tp: Unfinished(watermark=3, since=now_ms - 60_000)}
    found = await recover(settings.kafka, wanted, [same, other])
    assert found == {tp: {5, 6, 9}}


@pytest.mark.anyio
@pytest.mark.kafka
async def test_a_scan_that_cannot_reach_kafka_finds_nothing_and_ends(settings: Settings) -> None:
    tp = TopicPartition("missing", 0)
    unreachable = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}).kafka
    with anyio.fail_after(60):  # bounded by its budget and the consumer's close
        found = await recover(unreachable, {tp: Unfinished(0, 0)}, ["out"], budget_s=3.0)
    assert found == {}


@pytest.mark.anyio
@pytest.mark.kafka
async def test_an_output_names_only_its_own_record(settings: Settings) -> None:
    """A handler that passes an input's `stream-input` header on would make a next owner
    take another record for finished: the engine writes its own alone."""
    sink = await create_topic(settings, "rec-named", 1)
    tp = TopicPartition("t.requests", 2)
    forged = Output(sink, b"v", headers=(("request-id", b"r-1"), (HEADER, b"t.requests:2:99:0/1")))
    writer = AtLeastOnceSink(settings.kafka, consumer=None, producer_options={})
    await writer.start()
    partition = Partition(tp, PartitionOffsets(7), low_priority=False, key_ordering=False)
    assert partition.offsets.accept(7)
    try:
        assert await writer.write(partition, 7, [forged, forged])
    finally:
        await writer.stop()
    written = await read_all(settings, sink)
    assert [list(r.headers) for r in written] == [
        [("request-id", b"r-1"), (HEADER, b"t.requests:2:7:0/2")],
        [("request-id", b"r-1"), (HEADER, b"t.requests:2:7:1/2")],
    ]


@needs_kcat
@pytest.mark.anyio
@pytest.mark.kafka
async def test_an_output_the_client_cannot_read_ends_the_scan_not_the_engine(
    settings: Settings, kafka_bootstrap: str
) -> None:
    sink = await create_topic(settings, "rec-odd", 1)
    tp = TopicPartition("t.requests", 0)
    await produce(settings, sink, [Record(b"a", partition=0, headers=input_headers(tp, 4, 1))])
    await kcat_produce(kafka_bootstrap, sink, 0, [b"odd"], headers=[(b"\xff\xfe", b"v")])
    since = int(time.time() * 1000) - 60_000
    found = await recover(settings.kafka, {tp: Unfinished(0, since)}, [sink])
    assert found in ({}, {tp: {4}})  # what it read before the odd record counts


def _engine(
    settings: Settings, source: str, sink: str, handler: Any, group: str, **engine: Any
) -> Engine:
    """An engine copying `source` to `sink` through `handler`, with these engine settings."""
    return Engine(
        settings=dataclasses.replace(
            settings, engine=dataclasses.replace(settings.engine, **engine)
        ),
        name=group,
        group_id=settings.group(group),
        topics=[source],
        handler=handler,
        on_error=lambda record, exc: [],
        output_topics=[sink],
    )


@pytest.mark.anyio
@pytest.mark.kafka
@pytest.mark.parametrize("stuck", [False, True])
async def test_a_graceful_stop_that_drained_everything_leaves_no_note(
    settings: Settings, stuck: bool
) -> None:
    """A rolling restart's next owner (a static member: the same worker) has nothing to
    look for after a drain that finished every record; one that had to abandon a record
    mid-write leaves the note."""
    source = await create_topic(settings, "drained-in", 1)
    sink = await create_topic(settings, "drained-out", 1)
    await produce(settings, source, [f"r{i}".encode() for i in range(10)])
    handled = anyio.Event()
    count = 0

    async def handler(record: Any) -> Sequence[Output]:
        nonlocal count
        count += 1
        if count == 10:
            handled.set()
            if stuck:
                await anyio.sleep_forever()  # still running when the grace runs out
        return [Output(sink, record.value, follows=record.partition)]

    engine = _engine(settings, source, sink, handler, "drained-0.5", shutdown_grace_s=0.5)
    async with engine_on(engine):
        await handled.wait()
        while engine.snapshot().records_done < (9 if stuck else 10):  # noqa: ASYNC110
            await anyio.sleep(0.05)  # polling a counter, not ordering tasks
    (offset, metadata) = (await committed(settings, engine.group_id, source))[0]
    assert offset == (9 if stuck else 10)
    assert ("since" in split_notes(metadata)[1]) is stuck


@pytest.mark.anyio
@pytest.mark.kafka
async def test_an_exactly_once_owner_after_an_at_least_once_one_looks_for_its_outputs(
    settings: Settings,
) -> None:
    """A group run with mixed STREAM_GUARANTEE (a helper restarted a SIGKILLed at-least-once
    worker as exactly-once: 4 results twice in 800): the dead owner's commit has a `since`
    note and its outputs after that commit are in Kafka. The exactly-once successor finds
    them as an at-least-once one would, and runs only what has none."""
    source = await create_topic(settings, "mixed-in", 1)
    sink = await create_topic(settings, "mixed-out", 1)
    tp = TopicPartition(source, 0)
    await produce(settings, source, [f"r{i}".encode() for i in range(10)])
    group = settings.group("mixed")
    since = int(time.time() * 1000) - 60_000
    await commit(settings, group, {tp: 3}, with_notes("", {"since": str(since)}))
    written = [Record(b"done", partition=0, headers=input_headers(tp, o, 1)) for o in range(3, 7)]
    await produce(settings, sink, written)

    handled: set[int] = set()

    async def handler(record: Any) -> Sequence[Output]:
        handled.add(record.offset)
        return [Output(sink, record.value, follows=record.partition)]

    engine = _engine(settings, source, sink, handler, "mixed", guarantee="exactly-once")
    async with engine_on(engine):
        while engine.snapshot().records_done < 7:  # noqa: ASYNC110
            await anyio.sleep(0.05)  # polling a counter, not ordering tasks
    assert handled == {7, 8, 9}
    outputs = await read_all(settings, sink, isolation="read_committed")
    assert sorted(r.value for r in outputs) == [b"done"] * 4 + [b"r7", b"r8", b"r9"]


@pytest.mark.anyio
@pytest.mark.kafka
async def test_answers_lingering_when_the_grace_runs_out_are_written_and_not_run_again(
    settings: Settings,
) -> None:
    """A stop whose answers come in just before its grace runs out: their outputs wait in a
    batch for the linger (1 s here, past the 0.5 s grace) when the drain cancels their
    records. The batch still goes out, and the next owner finds every output and runs none
    of those records again. (A hostile pass found such batches thrown away: the next owner
    paid again for 53 answers.)"""
    source = await create_topic(settings, "lingered-in", 1)
    sink = await create_topic(settings, "lingered-out", 1)
    values = [f"r{i}".encode() for i in range(20)]
    await produce(settings, source, values)
    answer, all_waiting = anyio.Event(), anyio.Event()
    waiting = 0

    async def first(record: Any) -> Sequence[Output]:
        nonlocal waiting
        waiting += 1
        if waiting == len(values):
            all_waiting.set()
        await answer.wait()
        return [Output(sink, record.value, follows=record.partition)]

    lingering = dataclasses.replace(
        settings, kafka=dataclasses.replace(settings.kafka, linger_ms=1000)
    )
    engine = _engine(lingering, source, sink, first, "lingered", shutdown_grace_s=0.5)
    async with engine_on(engine):
        await all_waiting.wait()
        engine.stop()  # the drain begins
        answer.set()  # and the answers come in, into a batch that lingers past the grace
    assert engine.snapshot().abandoned == len(values)  # none was acknowledged in time
    assert sorted(r.value for r in await read_all(settings, sink)) == sorted(values)

    again: list[int] = []

    async def second(record: Any) -> Sequence[Output]:
        again.append(record.offset)
        return [Output(sink, record.value, follows=record.partition)]

    successor = _engine(settings, source, sink, second, "lingered")
    async with engine_on(successor):
        while successor.snapshot().records_done < len(values):  # noqa: ASYNC110
            await anyio.sleep(0.05)  # polling a counter, not ordering tasks
    assert again == []
    assert successor.snapshot().records_recovered == len(values)
    assert len(await read_all(settings, sink)) == len(values)
    assert (await committed(settings, successor.group_id, source))[0][0] == len(values)
