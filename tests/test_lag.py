from __future__ import annotations

import time

import anyio
import orjson
import pytest
from aiokafka import TopicPartition

from stream.config import Settings
from stream.devtools.jars import fetch_jars
from stream.observe.lag import LagMonitor, LagRow, LagTracker, Status
from stream.observe.lagcli import render
from stream.observe.lagreader import GroupReading, LagReader
from tests.kit import run_cli
from tests.kit.kafka import commit, create_topic, produce
from tests.kit.lag import by_partition, lag_json, live_member, parse_kafka_tool, stamped

pytestmark = pytest.mark.anyio

HOUR_MS = 3_600_000


# --- against Kafka's own tool ------------------------------------------------------------


async def test_lag_json_equals_kafka_consumer_groups_tool(
    settings: Settings, env: dict[str, str]
) -> None:
    topic = await create_topic(settings, "lag.tool", 3)
    now = int(time.time() * 1000)
    await produce(settings, topic, stamped(0, [now] * 7))
    await produce(settings, topic, stamped(1, [now] * 4))
    group = settings.group("tool")
    await commit(settings, group, {TopicPartition(topic, 0): 2, TopicPartition(topic, 1): 4})
    await commit(settings, group, {TopicPartition(topic, 2): 0})

    ours = await run_cli(
        env, "lag", "--group", group, "--json", "--samples", "2", "--interval", "0.1s"
    )
    tool = await anyio.run_process(
        [
            "java",
            "-Xmx256m",
            "-cp",
            f"{fetch_jars(quiet=True)}/*",
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            "--bootstrap-server",
            settings.kafka.bootstrap_servers,
            "--describe",
            "--group",
            group,
        ],
        check=True,
    )

    assert ours.returncode == 3, ours.stderr  # partition 0's records wait and nobody owns it
    rows = orjson.loads(ours.stdout)
    mine = {(r["topic"], r["partition"]): (r["committed"], r["end"], r["lag"]) for r in rows}
    theirs = parse_kafka_tool(tool.stdout.decode(), group)
    assert theirs == {(topic, 0): (2, 7, 5), (topic, 1): (4, 4, 0), (topic, 2): (0, 0, 0)}
    assert mine == theirs
    for row in rows:
        assert {"group", "lag_seconds", "status", "members"} <= set(row)
        assert row["group"] == group


# --- lag in seconds ----------------------------------------------------------------------


async def test_lag_seconds_is_the_age_of_the_record_at_the_committed_offset(
    settings: Settings,
) -> None:
    topic = await create_topic(settings, "lag.seconds", 2)
    now = int(time.time() * 1000)
    stamps = [now - 900_000 + i * 100_000 for i in range(6)]  # 100 s apart, the newest 400 s old
    await produce(settings, topic, stamped(0, stamps))
    await produce(settings, topic, stamped(1, [now - 50_000]))
    group = settings.group("seconds")
    await commit(settings, group, {TopicPartition(topic, 0): 2, TopicPartition(topic, 1): 1})

    async with LagReader(settings.kafka) as reader:
        (reading,) = await reader.read({group: ()})
        again = await reader.read({group: ()})  # the stuck offset's timestamp comes from the cache
    rows = by_partition(LagTracker().update([reading]))

    oldest_unprocessed = stamps[2] / 1000
    assert rows[0].lag == 4
    assert rows[0].lag_seconds == pytest.approx(reading.at - oldest_unprocessed, abs=1.0)
    assert rows[0].lag_seconds == pytest.approx(time.time() - oldest_unprocessed, abs=1.0)
    assert rows[1].lag == 0 and rows[1].lag_seconds == 0.0  # caught up: zero, known
    assert again[0].partitions[0].oldest_timestamp_ms == stamps[2]


async def test_never_committed_partitions_show_their_backlog_and_members_are_reported(
    settings: Settings,
) -> None:
    topic = await create_topic(settings, "lag.uncommitted", 3)
    now = int(time.time() * 1000)
    await produce(settings, topic, stamped(0, [now] * 3))
    await produce(settings, topic, stamped(1, [now - 120_000, now]))
    group = settings.group("uncommitted")
    await commit(settings, group, {TopicPartition(topic, 0): 1})
    async with live_member(settings, group, topic), LagReader(settings.kafka) as reader:
        (reading,) = await reader.read({group: ()})
    rows = by_partition(LagTracker().update([reading]))

    assert reading.members == 1
    assert rows[0].committed == 1 and rows[0].lag == 2 and rows[0].owner is not None
    # partition 1 was never committed: its whole log waits (the engine starts at the earliest)
    assert rows[1].committed is None and rows[1].lag == 2 and rows[1].owner == rows[0].owner
    assert rows[1].lag_seconds == pytest.approx(120, abs=5)
    assert rows[1].status is Status.OK  # one look, and its oldest record is young
    # partition 2 is empty and never committed: nothing waits, and that is known
    assert (rows[2].committed, rows[2].lag, rows[2].lag_seconds, rows[2].status) == (
        None,
        0,
        0.0,
        Status.OK,
    )


# --- window statuses on a real broker ----------------------------------------------------


async def read_rows(
    reader: LagReader, tracker: LagTracker, group: str, *, owners_told: bool = True
) -> dict[int, LagRow]:
    """Rows of `group`; without `owners_told`, as for a group on Kafka's newer protocol,
    whose members (and so who owns what) DescribeGroups does not show."""
    readings = await reader.read({group: ()})
    if not owners_told:
        readings = [r._replace(members=None) for r in readings]
    return by_partition(tracker.update(readings))


async def test_stopped_group_with_old_unprocessed_records_is_unowned_and_exits_3(
    settings: Settings, env: dict[str, str]
) -> None:
    topic = await create_topic(settings, "lag.stop", 1)
    await produce(settings, topic, stamped(0, [int(time.time() * 1000) - HOUR_MS] * 3))
    group = settings.group("stop")
    await commit(settings, group, {TopicPartition(topic, 0): 1})

    for done in await lag_json(env, group):
        assert done.returncode == 3, done.stderr
        (row,) = orjson.loads(done.stdout)
        assert (row["status"], row["lag"], row["members"]) == ("UNOWNED", 2, 0)
        assert row["lag_seconds"] >= 3600


async def test_member_that_holds_a_partition_without_progress_is_stall(
    settings: Settings, env: dict[str, str]
) -> None:
    topic = await create_topic(settings, "lag.stall", 1)
    await produce(settings, topic, stamped(0, [int(time.time() * 1000) - HOUR_MS] * 3))
    group = settings.group("stall")
    await commit(settings, group, {TopicPartition(topic, 0): 1})
    window = ("--samples", "3", "--interval", "0.1")
    async with live_member(settings, group, topic):
        done = await run_cli(env, "lag", "--group", group, "--json", *window)
        table = await run_cli(env, "lag", "--group", group, *window)
        one_look = await run_cli(env, "lag", "--group", group, "--json")

    assert done.returncode == 3, done.stderr
    (row,) = orjson.loads(done.stdout)
    assert (row["status"], row["members"]) == ("STALL", 1)
    assert table.returncode == 3
    assert f"group {group}: STALL, 1 member(s)" in table.stdout
    # one look cannot tell a stall from a backlog being worked off: it says BEHIND
    assert one_look.returncode == 3 and orjson.loads(one_look.stdout)[0]["status"] == "BEHIND"


async def test_idle_topic_with_zero_lag_is_ok_and_exits_0(
    settings: Settings, env: dict[str, str]
) -> None:
    topic = await create_topic(settings, "lag.idle", 1)
    await produce(settings, topic, stamped(0, [int(time.time() * 1000) - HOUR_MS] * 3))
    group = settings.group("idle")
    await commit(settings, group, {TopicPartition(topic, 0): 3})

    done = await run_cli(env, "lag", "--group", group, "--json")

    assert done.returncode == 0, done.stderr
    (row,) = orjson.loads(done.stdout)
    assert (row["status"], row["lag"], row["lag_seconds"]) == ("OK", 0, 0.0)


async def test_falling_behind_is_warn_and_going_back_is_rewind(settings: Settings) -> None:
    topic = await create_topic(settings, "lag.warn", 1)
    tp = TopicPartition(topic, 0)
    group = settings.group("warn")
    now = int(time.time() * 1000)
    tracker = LagTracker(window=3)
    async with LagReader(settings.kafka) as reader:
        statuses = []
        for step in range(3):  # each step: 10 new records, the consumer finishes only 2
            await produce(settings, topic, stamped(0, [now] * 10))
            await commit(settings, group, {tp: 2 * (step + 1)})
            rows = await read_rows(reader, tracker, group, owners_told=False)
            statuses.append(rows[0].status)
        await commit(settings, group, {tp: 1})  # someone reset the group
        rewound = (await read_rows(reader, tracker, group, owners_told=False))[0]

    assert statuses[-1] is Status.WARN
    assert rewound.status is Status.REWIND


async def test_progress_above_a_stuck_watermark_is_not_a_stall(settings: Settings) -> None:
    topic = await create_topic(settings, "lag.busy", 1)
    tp = TopicPartition(topic, 0)
    await produce(settings, topic, stamped(0, [int(time.time() * 1000) - HOUR_MS] * 10))
    group = settings.group("busy")
    tracker = LagTracker(window=3)
    async with LagReader(settings.kafka) as reader:
        # a slow record holds the watermark at 2 while the engine finishes 3, 4, then 7 (who
        # owns it is not told, as for a group on Kafka's newer protocol: only progress speaks)
        for finished in ("3", "3,4", "3,4,7"):
            await commit(settings, group, {tp: 2}, metadata=finished)
            busy = (await read_rows(reader, tracker, group, owners_told=False))[0]
        for _ in range(3):  # then nothing moves at all, and nobody owns the partition
            stopped = (await read_rows(reader, tracker, group))[0]

    assert busy.status is Status.OK
    assert stopped.status is Status.UNOWNED


async def test_missing_group_says_so_in_one_line(settings: Settings, env: dict[str, str]) -> None:
    group = settings.group("never-used")
    done = await run_cli(env, "lag", "--group", group)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"stream: error: consumer group '{group}' does not exist on "
        f"{settings.kafka.bootstrap_servers} (no members, no committed offsets)"
    ]
    # the name without the prefix the tests run under: the message says how it is named
    unprefixed = await run_cli(env, "lag", "--group", "predictions-primary")
    assert unprefixed.returncode == 1
    (line,) = unprefixed.stderr.strip().splitlines()
    assert f"the pipeline's groups are named {settings.group('')}<group>" in line


# --- the background monitor --------------------------------------------------------------


async def test_monitor_caches_rows_and_reports_health(settings: Settings) -> None:
    topic = await create_topic(settings, "lag.monitor", 1)
    await produce(settings, topic, stamped(0, [int(time.time() * 1000)] * 5))
    group = settings.group("monitor")
    await commit(settings, group, {TopicPartition(topic, 0): 3})
    monitor = LagMonitor(settings.kafka, [group], interval_s=0.05, window=3)
    assert monitor.rows() == () and not monitor.healthy

    async with anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        with anyio.fail_after(30):
            await monitor.next_round()
            await commit(settings, group, {TopicPartition(topic, 0): 4})
            while monitor.rows()[0].committed != 4:
                await monitor.next_round()
        tg.cancel_scope.cancel()

    (row,) = monitor.rows()
    assert (row.committed, row.end, row.lag) == (4, 5, 1)
    assert monitor.healthy and monitor.rounds >= 2 and "rounds=" in repr(monitor)


async def test_monitor_survives_an_unreachable_cluster() -> None:
    from stream.config import KafkaSettings
    from stream.devtools.broker import free_port

    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=1000)
    monitor = LagMonitor(kafka, ["g"], interval_s=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        with anyio.fail_after(30):
            await monitor.next_round()
        tg.cancel_scope.cancel()
    assert not monitor.healthy and monitor.errors >= 1
    assert monitor.last_error is not None and "cannot reach Kafka" in monitor.last_error


def test_table_shows_unknown_as_a_dash() -> None:
    row = LagRow("g", "t", 0, None, 5, None, None, Status.UNKNOWN, 1, "m")
    reading = GroupReading("g", True, "Stable", 1, (), 0.0)
    text = render([row], [reading])
    assert text.splitlines()[1].split() == ["g", "t", "0", "-", "5", "-", "-", "UNKNOWN"]
    assert text.splitlines()[-1] == "group g: UNKNOWN, 1 member(s), state Stable"


def test_table_says_when_a_group_committed_past_the_log_end() -> None:
    """Its lag reads 0 (Kafka's tool: negative), and a worker takes the records below the
    committed offset as done: the table says so under its rows."""
    rows = [
        LagRow("g", "t", 0, 1000, 10, 0, None, Status.OK, 1, "m"),
        LagRow("g", "t", 1, 10, 10, 0, None, Status.OK, 1, "m"),
    ]
    text = render(rows, [GroupReading("g", True, "Stable", 1, (), 0.0)])
    said = [line for line in text.splitlines() if "past its log end" in line]
    assert said == [
        "g committed t[0] at 1000, past its log end 10: a worker takes the records below 1000"
        ' as done (the README\'s "Under faults" says why and what to do)'
    ]


# --- timestamps are hints: what producers stamp cannot make lag lie ----------------------


async def test_a_record_stamped_0_in_flight_on_a_busy_partition_is_not_an_alarm(
    settings: Settings, env: dict[str, str]
) -> None:
    topic = await create_topic(settings, "lag.epoch", 1)
    now = int(time.time() * 1000)
    await produce(settings, topic, stamped(0, [now - 20_000, 0]))  # stamped 1970
    group = settings.group("epoch")
    await commit(settings, group, {TopicPartition(topic, 0): 1})
    window = ("--samples", "3", "--interval", "0.1")
    async with live_member(settings, group, topic):
        one_look = await run_cli(env, "lag", "--group", group, "--json")
        watched = await run_cli(env, "lag", "--group", group, "--json", *window)

    for done, status in ((one_look, "OK"), (watched, "OK")):
        assert done.returncode == 0, done.stderr
        (row,) = orjson.loads(done.stdout)
        assert (row["lag"], row["status"]) == (1, status)
        # its predecessor was written 20 s ago: it cannot have waited longer than that
        assert row["lag_seconds"] is None or row["lag_seconds"] < 60


async def test_a_record_without_a_timestamp_is_not_a_stall_until_watched_that_long(
    settings: Settings, env: dict[str, str]
) -> None:
    topic = await create_topic(settings, "lag.nostamp", 1)
    await produce(settings, topic, stamped(0, [-1]))  # Kafka's "no timestamp"
    group = settings.group("nostamp")
    await commit(settings, group, {TopicPartition(topic, 0): 0})
    tracker = LagTracker(window=3, stall_after_s=300)
    async with live_member(settings, group, topic), LagReader(settings.kafka) as reader:
        watched = await run_cli(env, "lag", "--group", group, "--json", "--samples", "3")
        (first,) = await reader.read({group: ()})
        tracker.update([first])
        (later,) = await reader.read({group: ()})
        # the same record, still waiting, 400 s after our first look (by our own clock)
        rows = [tracker.update([later._replace(at=first.at + 200 + 100 * i)]) for i in range(3)]

    assert watched.returncode == 0, watched.stderr
    (row,) = orjson.loads(watched.stdout)
    # a call in flight for a moment: nothing tells slow from stuck, and that is what it says
    assert (row["lag"], row["status"]) == (1, "UNKNOWN")
    assert row["lag_seconds"] is not None and 0 < row["lag_seconds"] < 60
    (stuck,) = rows[-1]
    assert stuck.status is Status.STALL
    assert stuck.lag_seconds == pytest.approx(400, abs=1)


async def test_a_future_stamp_does_not_hide_an_unowned_backlog(
    settings: Settings, env: dict[str, str]
) -> None:
    topic = await create_topic(settings, "lag.future", 2)
    now = int(time.time() * 1000)
    await produce(settings, topic, stamped(0, [now + 50 * 60_000, now, now, now]))
    await produce(settings, topic, stamped(1, [now - HOUR_MS] * 2))
    group = settings.group("future")
    await commit(settings, group, {TopicPartition(topic, 0): 0, TopicPartition(topic, 1): 0})

    for done in await lag_json(env, group):
        assert done.returncode == 3, done.stderr
        rows = {row["partition"]: row for row in orjson.loads(done.stdout)}
        assert [(r["lag"], r["members"], r["status"]) for r in rows.values()] == [
            (4, 0, "UNOWNED"),
            (2, 0, "UNOWNED"),
        ]
        # stamped 50 minutes ahead: not believed, so nothing about its age is claimed
        assert rows[0]["lag_seconds"] is None or rows[0]["lag_seconds"] < 60
        assert rows[1]["lag_seconds"] >= 3600
