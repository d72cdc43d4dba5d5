"""The local cluster itself (`stream kafka … --brokers 3`, `stream.devtools.cluster`): the
command that stops and starts its nodes, any one process lost (the active controller), and
lag read from every partition leader, equal to Kafka's own consumer-groups tool."""

from __future__ import annotations

import functools
import time

import anyio
import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic

from stream import topics
from stream.config import Settings
from stream.devtools.cluster import LocalCluster, describe_partitions
from stream.kafka import admin_client
from stream.kafkawire import registered_brokers
from stream.observe.lag import LagMonitor
from stream.stages import Topics
from tests.kit import eventually, run_cli
from tests.kit.cluster import BROKERS, in_sync, send, stop
from tests.kit.kafka import commit, produce
from tests.kit.lag import parse_kafka_tool, stamped

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


@pytest.fixture
def settings_for(cluster_env: dict[str, str]) -> Settings:
    return Settings.from_env(cluster_env)


def kafka_cli(cluster: LocalCluster, *args: str) -> list[str]:
    layout = ["--brokers", str(cluster.brokers), "--port", str(cluster.port)]
    return ["kafka", *args, *layout, "--home", str(cluster.home)]


async def test_kafka_command_stops_and_starts_one_broker_and_reports_the_cluster(
    cluster: LocalCluster, cluster_env: dict[str, str]
) -> None:
    status = await run_cli(cluster_env, *kafka_cli(cluster, "status"))
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[-1] == f"bootstrap: {cluster.bootstrap_servers}"
    assert sum("running (pid" in line for line in status.stdout.splitlines()) == 6

    killed = await run_cli(cluster_env, *kafka_cli(cluster, "stop", "--broker", "2", "--kill"))
    assert killed.stdout.strip() == "broker 2 killed (SIGKILL)", killed.stderr
    status = await run_cli(cluster_env, *kafka_cli(cluster, "status"))
    assert status.returncode == 3  # needs attention: one process is down
    assert f"broker 2      127.0.0.1:{cluster.port + 1:<6} stopped" in status.stdout
    report = await run_cli(cluster_env, *kafka_cli(cluster, "status", "--json"))
    assert report.returncode == 3
    shape = orjson.loads(report.stdout)
    assert (shape["state"], shape["running"], shape["pid"]) == ("partly running", False, None)
    assert shape["bootstrap_servers"] == cluster.bootstrap_servers
    nodes = {node["name"]: node for node in shape["nodes"]}
    assert len(nodes) == 6 and nodes["broker 2"] == {
        "name": "broker 2",
        "port": cluster.port + 1,
        "pid": None,
    }

    started = await run_cli(cluster_env, *kafka_cli(cluster, "start", "--broker", "2"))
    assert started.stdout.strip() == f"broker 2 started at port {cluster.port + 1}"
    stopped = await run_cli(cluster_env, *kafka_cli(cluster, "stop", "--broker", "3"))
    assert stopped.stdout.strip() == "broker 3 stopped (clean shutdown)"
    again = await run_cli(cluster_env, *kafka_cli(cluster, "stop", "--broker", "3"))
    assert again.stdout.strip() == "broker 3 was not running"
    whole = await run_cli(cluster_env, *kafka_cli(cluster, "start"))
    assert "started 1 of 6 processes" in whole.stdout, whole.stderr
    assert (await run_cli(cluster_env, *kafka_cli(cluster, "status"))).returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (["stop", "--broker", "4"], 2, "there is no broker 4: this cluster has 1 to 3"),
        (["start", "--broker", "0"], 2, "there is no broker 0: this cluster has 1 to 3"),
        (["status", "--controller", "-1"], 2, "there is no controller -1: this cluster has 1 to 3"),
        (["stop", "--kill"], 2, "--kill goes with stop --broker N or stop --controller N"),
        (["start", "--broker", "1", "--kill"], 2, "--kill goes with stop --broker N"),
    ],
)
async def test_kafka_command_refuses_what_it_cannot_do_in_one_line(
    cluster: LocalCluster, cluster_env: dict[str, str], args: list[str], code: int, error: str
) -> None:
    done = await run_cli(cluster_env, *kafka_cli(cluster, *args))
    assert done.returncode == code, done.stderr  # 2: a usage error
    (line,) = done.stderr.strip().splitlines()
    assert error in line


async def test_a_cluster_home_made_for_another_layout_is_refused(
    cluster: LocalCluster, cluster_env: dict[str, str]
) -> None:
    home = str(cluster.home)
    other = await run_cli(cluster_env, "kafka", "status", "--brokers", "2", "--home", home)
    single = await run_cli(cluster_env, "kafka", "status", "--brokers", "1", "--home", home)
    assert other.returncode == single.returncode == 1
    assert f"holds a cluster made with --brokers 3 --port {cluster.port}" in other.stderr
    made = f"pass --brokers as when it was started (--brokers 3 --port {cluster.port})"
    assert made in single.stderr
    # without --brokers or --port, its home says them
    itself = await run_cli(cluster_env, "kafka", "status", "--home", home)
    assert itself.returncode == 0 and f"127.0.0.1:{cluster.port}" in itself.stdout


async def test_the_active_controller_killed_the_cluster_goes_on(
    cluster: LocalCluster, cluster_env: dict[str, str], settings_for: Settings
) -> None:
    active = await anyio.to_thread.run_sync(cluster.quorum_leader)
    await stop(cluster, active)
    # Metadata changes need the quorum: topics are created, and a new leader takes over.
    await topics.apply(settings_for, await topics.plan(settings_for))
    names = Topics.of(settings_for)
    await send(settings_for, range(10))
    successor = await anyio.to_thread.run_sync(cluster.quorum_leader)
    states = await describe_partitions(settings_for.kafka, [names.requests])
    assert successor is not active
    assert all(len(state.isr) == BROKERS for state in states.values())


# -- lag across the cluster -------------------------------------------------------------


async def kafka_tool_describe(cluster: LocalCluster, group: str) -> str:
    """Kafka's consumer-groups tool (kafka-consumer-groups.sh --describe) on the cluster."""
    tool = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
    return await anyio.to_thread.run_sync(
        functools.partial(cluster.run_tool, tool, "--describe", "--group", group)
    )


async def lag_rows(env: dict[str, str], group: str) -> dict[tuple[str, int], tuple[int, int, int]]:
    ours = await run_cli(
        env, "lag", "--group", group, "--json", "--samples", "2", "--interval", "0.1"
    )
    # 3: the groups here have no live member, so partitions with records waiting are UNOWNED
    assert ours.returncode == 3, ours.stderr
    rows = orjson.loads(ours.stdout)
    return {(r["topic"], r["partition"]): (r["committed"], r["end"], r["lag"]) for r in rows}


async def test_lag_reads_every_leader_and_equals_kafkas_tool_with_a_broker_down(
    cluster: LocalCluster, cluster_env: dict[str, str], settings_for: Settings
) -> None:
    settings = settings_for
    topic = settings.topic("lag.cluster")
    async with admin_client(settings.kafka, doing="test") as admin:
        await admin.create_topics([NewTopic(topic, BROKERS, BROKERS)])
    await eventually(functools.partial(has_leaders, settings, topic))
    leaders = {
        tp.partition: s.leader
        for tp, s in (await describe_partitions(settings.kafka, [topic])).items()
    }
    assert sorted(leaders.values()) == [1, 2, 3]  # one partition led by each broker
    now = int(time.time() * 1000)
    for partition, count in enumerate((7, 4, 5)):
        await produce(settings, topic, stamped(partition, [now] * count))
    group = settings.group("lag")
    await commit(settings, group, {TopicPartition(topic, 0): 2, TopicPartition(topic, 1): 4})
    await commit(settings, group, {TopicPartition(topic, 2): 1})
    expected = {(topic, 0): (2, 7, 5), (topic, 1): (4, 4, 0), (topic, 2): (1, 5, 4)}

    assert await lag_rows(cluster_env, group) == expected
    assert parse_kafka_tool(await kafka_tool_describe(cluster, group), group) == expected

    # A partition's leader gone: its partition moves, and both still agree.
    await stop(cluster, cluster.broker(leaders[2]))
    await in_sync(settings, [topic], BROKERS - 1)
    assert await lag_rows(cluster_env, group) == expected
    assert parse_kafka_tool(await kafka_tool_describe(cluster, group), group) == expected

    monitor = LagMonitor(settings.kafka, [group], interval_s=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        with anyio.fail_after(60):
            await monitor.next_round()
            while not monitor.healthy:
                await monitor.next_round()
        tg.cancel_scope.cancel()
    metrics = {(r.topic, r.partition): (r.committed, r.end, r.lag) for r in monitor.rows()}
    assert metrics == expected


async def has_leaders(settings: Settings, topic: str) -> bool:
    states = await describe_partitions(settings.kafka, [topic])
    return len(states) == BROKERS and all(s.leader >= 0 for s in states.values())


async def test_topics_apply_counts_a_broker_stopped_cleanly(
    cluster: LocalCluster, cluster_env: dict[str, str], settings_for: Settings
) -> None:
    """A clean shutdown fences the broker, and Metadata (aiokafka's describe_cluster) leaves
    it out; DescribeCluster v2 still lists it, so topics made now keep replication 3."""
    await stop(cluster, cluster.broker(BROKERS), kill=False)
    async with admin_client(settings_for.kafka, doing="test") as admin:

        async def fenced() -> bool:
            live = {int(b["node_id"]) for b in (await admin.describe_cluster())["brokers"]}
            registered = await registered_brokers(admin)
            return live == {1, 2} and registered == {1: False, 2: False, 3: True}

        await eventually(fenced)

    applied = await run_cli(cluster_env, "topics", "apply")
    assert applied.returncode == 0, applied.stderr
    assert "replication" not in applied.stdout  # nothing fitted to a smaller cluster
    names = sorted(set(vars(Topics.of(settings_for)).values()))
    states = await describe_partitions(settings_for.kafka, names)
    assert {len(state.replicas) for state in states.values()} == {BROKERS}
