"""What lag means, read from a real broker: transaction markers, never-committed partitions,
empty ones, groups that have not committed yet, and a `stream lag` that always returns."""

from __future__ import annotations

import time
from typing import Any

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import NodeNotReadyError
from hypothesis import given
from hypothesis import strategies as st

from stream import topics
from stream.config import Settings
from stream.errors import KafkaError
from stream.kafka import _AdminClient
from stream.observe.lag import LagTracker, Status
from stream.observe.lagreader import PIPELINE_GROUPS, GroupReading, LagReader, PartitionReading
from tests.kit import run_cli
from tests.kit.kafka import commit, create_topic, has_connections, produce
from tests.kit.lag import by_partition, lag_json, stamped

pytestmark = pytest.mark.anyio

HOUR_MS = 3_600_000


async def produce_transaction(settings: Settings, topic: str, count: int, *, abort: bool) -> None:
    """`count` records in one transaction on partition 0, committed or aborted: either way
    a control record (the marker) follows them."""
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), transactional_id=f"{topic}-{time.monotonic_ns()}"
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        for _ in range(count):
            await producer.send_and_wait(topic, b"{}", partition=0)
        if abort:
            await producer.abort_transaction()
        else:
            await producer.commit_transaction()
    finally:
        await producer.stop()


# --- transaction markers -----------------------------------------------------------------


async def test_a_transaction_marker_after_the_last_record_is_not_lag(
    settings: Settings, env: dict[str, str]
) -> None:
    """Exactly-once leaves a commit marker after the last record: committed 3, end 4."""
    topic = await create_topic(settings, "lag.marker", 1)
    await produce_transaction(settings, topic, 3, abort=False)
    group = settings.group("marker")
    await commit(settings, group, {TopicPartition(topic, 0): 3})

    with anyio.fail_after(30):  # it used to hang ~50 s closing its consumer, after 5 s per look
        answers = await lag_json(env, group)

    for answer in answers:
        assert answer.returncode == 0, answer.stderr
        (row,) = orjson.loads(answer.stdout)
        assert (row["committed"], row["end"], row["lag"], row["lag_seconds"]) == (3, 4, 0, 0.0)
        assert row["status"] == "OK"


async def test_aborted_records_and_markers_are_not_lag_but_records_after_them_are(
    settings: Settings,
) -> None:
    topic = await create_topic(settings, "lag.aborted", 1)
    await produce_transaction(settings, topic, 2, abort=True)  # offsets 0-1, marker 2
    group = settings.group("aborted")
    await commit(settings, group, {TopicPartition(topic, 0): 0})
    async with LagReader(settings.kafka, fetch_timeout_s=2.0) as reader:
        (only_aborted,) = await reader.read({group: ()})
        old = int(time.time() * 1000) - 60_000
        await produce(settings, topic, stamped(0, [old, old]))  # offsets 3-4: real work
        (then,) = await reader.read({group: ()})

    assert only_aborted.partitions[0].lag == 0
    (row,) = LagTracker().update([then])
    # counted from the first record that waits (offset 3), not from the committed 0
    assert (row.committed, row.end, row.lag) == (0, 5, 2)
    assert row.lag_seconds == pytest.approx(60, abs=5)


# --- partitions and groups without commits -------------------------------------------------


async def test_pipeline_groups_that_never_committed_show_every_partition_and_their_backlog(
    settings: Settings, env: dict[str, str]
) -> None:
    await topics.apply(settings, await topics.plan(settings))
    requests = settings.topic("predictions.requests")
    await produce(settings, requests, stamped(1, [int(time.time() * 1000)] * 2))

    done = await run_cli(env, "lag", "--json")

    assert done.returncode == 3, done.stderr  # records wait and no worker runs yet
    rows = orjson.loads(done.stdout)
    seen = {(r["group"], r["topic"]) for r in rows}
    wanted = {
        (settings.group(group), settings.topic(topic))
        for group, names in PIPELINE_GROUPS.items()
        for topic in names
    }
    assert seen == wanted
    backlog = [r for r in rows if r["lag"]]
    assert [
        (r["topic"], r["partition"], r["lag"], r["committed"], r["status"]) for r in backlog
    ] == [(requests, 1, 2, None, "UNOWNED")]
    # empty partitions are OK, not UNKNOWN
    assert {r["status"] for r in rows if not r["lag"]} == {"OK"}
    assert done.stderr == ""


async def test_a_named_group_with_nothing_says_so_in_one_line(
    settings: Settings, env: dict[str, str]
) -> None:
    group = settings.group("nobody")
    done = await run_cli(env, "lag", "--group", group)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "does not exist" in done.stderr


async def test_pipeline_groups_without_their_topics_say_to_apply_them(
    settings: Settings, env: dict[str, str]
) -> None:
    done = await run_cli(env, "lag")
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and all("stream topics apply" in line for line in lines)
    assert settings.topic("predictions.fallback") in lines[1]


# --- the command's options and time bounds -------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("--stall-after", "-5"), ("--stall-after", "inf"), ("--interval", "0"),
     ("--interval", "nan"), ("--interval", "1e308"), ("--samples", "0"), ("--group", " ")],
)  # fmt: skip
async def test_bad_options_are_one_line_and_exit_2(
    env: dict[str, str], option: str, value: str
) -> None:
    done = await run_cli(env, "lag", option, value)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert option in done.stderr and "Traceback" not in done.stderr


async def test_a_cluster_that_accepts_but_never_answers_is_one_line_within_the_bound(
    env: dict[str, str],
) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def swallow(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, swallow)
            with anyio.fail_after(60):
                done = await run_cli({**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}, "lag")
            tg.cancel_scope.cancel()
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "did not answer" in done.stderr


@pytest.mark.parametrize("ending", ["cancelled", "failed"])
async def test_a_reader_that_cannot_finish_opening_closes_what_it_opened(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """Cancelled (a bounded wait, Ctrl-C) or failing once its clients are up, as it asks
    the cluster's id: its consumer and admin client are closed, not left to the collector."""
    started: list[Any] = []
    asked = anyio.Event()
    original_start = AIOKafkaConsumer.start

    async def start(self: AIOKafkaConsumer) -> None:
        started.append(self)
        await original_start(self)

    async def describe_cluster(self: Any) -> dict[str, Any]:
        started.append(self)
        asked.set()
        if ending == "failed":
            raise NodeNotReadyError("no broker answered")
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(AIOKafkaConsumer, "start", start)
    monkeypatch.setattr(_AdminClient, "describe_cluster", describe_cluster)
    with anyio.fail_after(30):
        if ending == "failed":
            with pytest.raises(KafkaError):
                async with LagReader(settings.kafka):
                    raise AssertionError("it opened")
        else:
            async with anyio.create_task_group() as tg:

                async def opens() -> None:
                    async with LagReader(settings.kafka):
                        raise AssertionError("it opened")

                tg.start_soon(opens)
                await asked.wait()
                tg.cancel_scope.cancel()
    consumer, admin = started
    assert isinstance(consumer, AIOKafkaConsumer) and isinstance(admin, _AdminClient)
    # stopped (its background tasks too), not only disconnected
    assert consumer._closed and admin._closed
    assert not has_connections(consumer) and not has_connections(admin)


# --- pure: what a reading's position and lag are ------------------------------------------


@st.composite
def readings(draw: st.DrawFn) -> PartitionReading:
    start = draw(st.integers(0, 1000))
    end = draw(st.integers(start, 2000))
    committed = draw(st.none() | st.integers(0, end))
    first = draw(st.none() | st.integers(start, end))
    return PartitionReading("t", 0, committed, None, start, end, first, None, None)


@given(readings())
def test_lag_is_never_negative_nor_more_than_the_log_holds(p: PartitionReading) -> None:
    assert p.position is not None and p.end is not None and p.start is not None
    assert p.start <= p.position
    assert 0 <= (p.lag or 0) <= p.end - p.position <= p.end - p.start


@given(readings())
def test_only_markers_left_means_no_lag(p: PartitionReading) -> None:
    assert p._replace(first_waiting=p.end).lag == 0


@given(readings())
def test_never_committed_counts_from_the_log_start(p: PartitionReading) -> None:
    fresh = p._replace(committed=None, first_waiting=None)
    assert fresh.position == p.start and fresh.lag == (p.end or 0) - (p.start or 0)


def test_unknown_ends_stay_unknown() -> None:
    p = PartitionReading("t", 0, 3, None, 0, None, None, None, None)
    assert p.lag is None
    (row,) = LagTracker().update([GroupReading("g", True, "Stable", 1, (p,), 0.0)])
    assert row.status is Status.UNKNOWN and row.lag_seconds is None


async def test_one_reading_finds_a_record_waiting_behind_old_ones(settings: Settings) -> None:
    topic = await create_topic(settings, "lag.old", 2)
    await produce(settings, topic, stamped(0, [int(time.time() * 1000) - HOUR_MS] * 2))
    group = settings.group("old")
    await commit(settings, group, {TopicPartition(topic, 0): 0})
    async with LagReader(settings.kafka, fetch_timeout_s=2.0) as reader:
        rows = by_partition(LagTracker().update(await reader.read({group: ()})))
    assert rows[0].lag == 2 and rows[0].lag_seconds is not None and rows[0].lag_seconds >= 3600
    assert rows[0].status is Status.UNOWNED
    assert rows[1].lag == 0 and rows[1].status is Status.OK
