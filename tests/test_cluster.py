"""The pipeline on a three-broker cluster (replication 3, min.insync.replicas 2) while
brokers die: partition leaders killed under load, one broker gone for good, two gone.

One cluster (`stream.devtools.cluster`: three brokers, three controllers) serves the whole
session, started only when a test here runs; each test puts back whatever it stopped. These
tests kill the cluster's processes, so they always run on their own local cluster, even when
KAFKA_BOOTSTRAP_SERVERS names another (`-m "not cluster"` leaves them out).
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic

from stream import topics
from stream.config import Settings
from stream.devtools.cluster import (
    CONTROLLERS,
    ClusterNode,
    LocalCluster,
    describe_partitions,
    free_ports,
)
from stream.devtools.faults import parse_faults, parse_latency
from stream.devtools.simulator import SimConfig, Simulator
from stream.errors import BrokerError
from stream.kafka import admin_client
from stream.observe.lag import LagMonitor
from stream.stages import Topics
from stream.worker import Worker
from tests.conftest import eventually, run_cli
from tests.enginekit import read_all
from tests.lagkit import commit, parse_kafka_tool
from tests.lagkit import produce as produce_at

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

BROKERS = 3
# Synthetic's Kimi is down: half the requests go through the fallback stage to Together.
MODELS = ("deepseek-v3-0324-syn", "kimi-k2-thinking-syn")
FAULTS = "hf:moonshotai/Kimi-K2-Thinking=rate:1:503"


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    home = tmp_path_factory.mktemp("cluster")
    for attempt in range(3):  # a free port block can be taken between the probe and the start
        cluster = LocalCluster(
            home=home / str(attempt), port=free_ports(BROKERS + CONTROLLERS), brokers=BROKERS
        )
        try:
            cluster.start()
            break
        except BrokerError:
            if attempt == 2:
                raise
    try:
        yield cluster
    finally:
        cluster.kill()  # its data goes with the session: no need for a clean shutdown


@pytest.fixture
def cluster(local_cluster: LocalCluster) -> Iterator[LocalCluster]:
    yield local_cluster
    local_cluster.start()  # whatever the test stopped comes back for the next one


@pytest.fixture
def cluster_env(local_cluster: LocalCluster, prefix: str) -> dict[str, str]:
    import os

    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STREAM_", "SYNTHETIC_", "TOGETHER_", "KAFKA_"))
    }
    return {
        **keep,
        "KAFKA_BOOTSTRAP_SERVERS": local_cluster.bootstrap_servers,
        "STREAM_TOPIC_PREFIX": prefix,
        "STREAM_METRICS_PORT": "0",
    }


@pytest.fixture
def settings_for(cluster_env: dict[str, str]) -> Settings:
    return Settings.from_env(cluster_env)


# -- helpers --------------------------------------------------------------------------


def request(rid: str, n: int) -> bytes:
    return orjson.dumps(
        {
            "request_id": rid,
            "model": MODELS[n % len(MODELS)],
            "messages": [{"role": "user", "content": f"question {n}"}],
        }
    )


@dataclass
class Pipeline:
    settings: Settings
    worker: Worker
    sim: Simulator

    @property
    def done(self) -> int:
        return sum(engine.snapshot().records_done for engine in self.worker.engines)

    def topics(self) -> list[str]:
        return sorted(set(vars(Topics.of(self.settings)).values()))


@asynccontextmanager
async def pipeline(
    env: dict[str, str], guarantee: str, latency: str = "uniform:0.1:0.4"
) -> AsyncIterator[Pipeline]:
    """Topics applied on the cluster, the simulator, and both stages in this process."""
    config = SimConfig(latency=parse_latency(latency), faults=parse_faults(FAULTS))
    async with Simulator(config) as sim:
        settings = Settings.from_env(
            {
                **env,
                "STREAM_GUARANTEE": guarantee,
                "STREAM_MAX_IN_FLIGHT": "40",
                "SYNTHETIC_BASE_URL": sim.url,
                "SYNTHETIC_API_KEY": "sim",
                "TOGETHER_BASE_URL": sim.url,
                "TOGETHER_API_KEY": "sim",
                "STREAM_SYNTHETIC_MAX_RETRIES": "1",
            }
        )
        await topics.apply(settings, await topics.plan(settings))
        worker = Worker(settings, ("primary", "fallback"), lag_interval_s=1.0)
        async with anyio.create_task_group() as group:
            group.start_soon(worker.run)
            await worker.started.wait()
            for engine in worker.engines:
                with anyio.fail_after(60):
                    await engine.ready.wait()
            yield Pipeline(settings, worker, sim)
            worker.stop()


async def send(
    settings: Settings, ids: range, *, per_second: float = 0.0, acks: object = "all"
) -> None:
    """Write requests `ids`, at `per_second` when given; with acks=all the producer is
    idempotent and retries across a leader change, so each request is written once."""
    options = {"acks": acks, "enable_idempotence": acks == "all"}
    producer = AIOKafkaProducer(**settings.kafka.client_options(), **options)
    await producer.start()
    try:
        topic = Topics.of(settings).requests
        began = time.monotonic()
        pending = []
        for i in ids:
            if per_second:
                await anyio.sleep(max(0.0, began + (i - ids.start) / per_second - time.monotonic()))
            rid = f"r-{i}"
            pending.append(await producer.send(topic, request(rid, i), key=rid.encode()))
        for future in pending:
            await future
    finally:
        await producer.stop()


async def terminal_counts(settings: Settings) -> collections.Counter[str]:
    """Terminal records per request id, as a read_committed reader sees them."""
    names = Topics.of(settings)
    counts: collections.Counter[str] = collections.Counter()
    for topic in (names.results, names.dead_letter):
        for record in await read_all(settings, topic, isolation="read_committed"):
            counts[orjson.loads(record.value)["request_id"]] += 1
    return counts


async def all_answered(
    settings: Settings, ids: range, timeout_s: float = 120.0
) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()

    async def complete() -> bool:
        nonlocal counts
        counts = await terminal_counts(settings)
        return all(counts[f"r-{i}"] for i in ids)

    await eventually(complete, timeout_s=timeout_s)
    return counts


async def stop(cluster: LocalCluster, node: ClusterNode, *, kill: bool = True) -> None:
    await anyio.to_thread.run_sync(functools.partial(cluster.stop_node, node, kill=kill))


async def start(cluster: LocalCluster, node: ClusterNode) -> None:
    await anyio.to_thread.run_sync(cluster.start_node, node)


async def leader(settings: Settings, tp: TopicPartition) -> int:
    return (await describe_partitions(settings.kafka, [tp.topic]))[tp].leader


async def in_sync(settings: Settings, names: list[str], size: int, timeout_s: float = 60.0) -> None:
    """Until every partition of `names` has exactly `size` in-sync replicas."""

    async def check() -> bool:
        states = await describe_partitions(settings.kafka, names)
        return all(len(state.isr) == size for state in states.values())

    await eventually(check, timeout_s=timeout_s)


async def topic_configs(settings: Settings, names: list[str]) -> dict[str, dict[str, str]]:
    async with admin_client(settings.kafka, doing="test") as admin:
        return {name: await topics._configs(admin, name) for name in names}


async def progress(p: Pipeline, records: int, timeout_s: float = 60.0) -> None:
    """Until the stages finish `records` more records."""
    start_at = p.done

    async def check() -> bool:
        return p.done >= start_at + records

    await eventually(check, timeout_s=timeout_s)


async def kill_leader_under_load(p: Pipeline, cluster: LocalCluster, tp: TopicPartition) -> int:
    """SIGKILL `tp`'s leader; the pipeline must go on while it is down; then bring it back."""
    dead = await leader(p.settings, tp)
    await stop(cluster, cluster.broker(dead))

    async def moved() -> bool:
        return (await leader(p.settings, tp)) not in (dead, -1)

    await eventually(moved, timeout_s=60)
    await progress(p, 20)  # while it is still down
    await start(cluster, cluster.broker(dead))
    await in_sync(p.settings, p.topics(), BROKERS)
    return dead


# -- (a) leaders killed under load ----------------------------------------------------


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
async def test_pipeline_goes_on_while_partition_leaders_are_killed(
    cluster: LocalCluster, cluster_env: dict[str, str], guarantee: str
) -> None:
    count = 400
    ids = range(count)
    async with pipeline(cluster_env, guarantee) as p, anyio.create_task_group() as group:
        names = Topics.of(p.settings)
        group.start_soon(functools.partial(send, p.settings, ids, per_second=16))
        await progress(p, 30)
        killed = [
            await kill_leader_under_load(p, cluster, TopicPartition(names.requests, 0)),
            await kill_leader_under_load(p, cluster, TopicPartition(names.results, 1)),
        ]
        counts = await all_answered(p.settings, ids)
    logging.getLogger(__name__).info("killed brokers %s", killed)

    missing = [rid for rid in (f"r-{i}" for i in ids) if counts[rid] == 0]
    stray = set(counts) - {f"r-{i}" for i in ids}
    doubled = {rid: n for rid, n in counts.items() if n > 1}
    assert not missing and not stray
    if guarantee == "exactly-once":
        assert not doubled
    results = await read_all(p.settings, names.results, isolation="read_committed")
    providers = collections.Counter(orjson.loads(r.value)["provider"] for r in results)
    assert providers["synthetic"] and providers["together"]  # both stages worked through it


# -- (b) one broker down for good -----------------------------------------------------


async def test_one_broker_down_for_good_the_pipeline_goes_on_in_sync_on_two(
    cluster: LocalCluster, cluster_env: dict[str, str]
) -> None:
    async with pipeline(cluster_env, "exactly-once") as p:
        names = Topics.of(p.settings)
        dead = await leader(p.settings, TopicPartition(names.requests, 0))
        await stop(cluster, cluster.broker(dead))
        await in_sync(p.settings, p.topics(), BROKERS - 1)

        # `topics apply` counts the broker that is away: topics made now keep replication 3
        late = {**cluster_env, "STREAM_TOPIC_PREFIX": cluster_env["STREAM_TOPIC_PREFIX"] + "late."}
        applied = await run_cli(late, "topics", "apply")
        assert applied.returncode == 0, applied.stderr
        assert "replication" not in applied.stdout  # nothing fitted to a smaller cluster
        late_topics = sorted(set(vars(Topics.of(Settings.from_env(late))).values()))

        ids = range(200)
        await send(p.settings, ids)
        counts = await all_answered(p.settings, ids)
        states = await describe_partitions(p.settings.kafka, p.topics() + late_topics)

    assert {counts[f"r-{i}"] for i in ids} == {1}
    assert set(counts) == {f"r-{i}" for i in ids}
    for tp, state in states.items():
        assert len(state.replicas) == BROKERS, tp  # declared replication 3, kept
        assert dead not in state.isr and len(state.isr) == BROKERS - 1 and state.leader != dead
    configs = await topic_configs(p.settings, p.topics())
    assert {c["min.insync.replicas"] for c in configs.values()} == {"2"}


# -- (c) two brokers down: below min.insync.replicas ------------------------------------


async def scrape(worker: Worker, path: str) -> tuple[int, str]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{worker.port}{path}")
    return response.status_code, response.text


def output_wait(metrics: str, engine: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("stream_engine_output_wait_seconds{") and f'engine="{engine}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no stream_engine_output_wait_seconds for {engine}")


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_two_brokers_down_the_worker_holds_its_work_says_so_and_catches_up(
    cluster: LocalCluster,
    cluster_env: dict[str, str],
    guarantee: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Calls take 4 s: the brokers die while they run, and their outputs find one replica.
    async with pipeline(cluster_env, guarantee, latency="4") as p:
        names = Topics.of(p.settings)
        survivor = await leader(p.settings, TopicPartition(names.requests, 0))
        ids = range(100, 160, 2)  # one model, answered by Synthetic: one call per request
        await send(p.settings, ids)
        primary = p.worker.engines[0]

        async def all_running() -> bool:
            return primary.snapshot().in_flight == len(ids)

        await eventually(all_running)
        for node in cluster.broker_nodes:
            if node.node_id != survivor:
                await stop(cluster, node)
        calls = len(ids)

        async def blocked() -> bool:
            return primary.problem() is not None

        await eventually(blocked, timeout_s=60)
        status, text = await scrape(p.worker, "/readyz")
        assert status == 503 and "engine primary: outputs of" in text, text
        assert "not taken by Kafka" in text and " in 5 s)" in text  # its last error: late
        assert output_wait((await scrape(p.worker, "/metrics"))[1], "primary") >= 10
        assert any("Kafka takes no outputs of" in r.getMessage() for r in caplog.records)
        await in_sync(p.settings, p.topics(), 1)  # the controllers fenced the other two
        fenced = time.time()

        async def lag_read() -> bool:  # leaders elected below min.insync.replicas: unknown ends
            return (p.worker.monitor.last_success or 0.0) > fenced

        await eventually(lag_read, timeout_s=30)

        # Nothing is lowered to fit the one broker left.
        plan = await run_cli(cluster_env, "topics", "apply", "--dry-run")
        assert plan.returncode == 0, plan.stderr
        assert all(line.split()[1] == "ok" for line in plan.stdout.splitlines()[:-1]), plan.stdout

        assert primary.snapshot().records_done == 0  # seconds later, still nothing finished
        assert primary.problem() is not None
        assert not set(await terminal_counts(p.settings)) & {f"r-{i}" for i in ids}

        await start(cluster, next(n for n in cluster.broker_nodes if n.node_id != survivor))
        counts = await all_answered(p.settings, ids)

        async def ready() -> bool:
            return (await scrape(p.worker, "/readyz"))[0] == 200

        await eventually(ready, timeout_s=60)
        assert output_wait((await scrape(p.worker, "/metrics"))[1], "primary") == 0
        assert p.sim.stats()["requests"] == calls  # no call was made again

    assert {counts[f"r-{i}"] for i in ids} == {1}  # none lost, none written twice
    results = await read_all(p.settings, Topics.of(p.settings).results, isolation="read_committed")
    assert len(results) == len(ids)  # answers, not dead letters


# -- the cluster itself: the command, and any one process lost ------------------------


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
    ("args", "error"),
    [
        (["stop", "--broker", "4"], "there is no broker 4: this cluster has 1 to 3"),
        (["stop", "--kill"], "--kill goes with stop --broker N or stop --controller N"),
        (["start", "--broker", "1", "--kill"], "--kill goes with stop --broker N"),
    ],
)
async def test_kafka_command_refuses_what_it_cannot_do_in_one_line(
    cluster: LocalCluster, cluster_env: dict[str, str], args: list[str], error: str
) -> None:
    done = await run_cli(cluster_env, *kafka_cli(cluster, *args))
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert error in line


async def test_a_cluster_home_made_for_another_layout_is_refused(
    cluster: LocalCluster, cluster_env: dict[str, str]
) -> None:
    home = str(cluster.home)
    other = await run_cli(cluster_env, "kafka", "status", "--brokers", "3", "--home", home)
    single = await run_cli(cluster_env, "kafka", "status", "--home", home)
    assert other.returncode == single.returncode == 1
    assert f"holds a cluster made with --brokers 3 --port {cluster.port}" in other.stderr
    assert "holds a local cluster: pass --brokers" in single.stderr


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
    assert ours.returncode == 0, ours.stderr
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
        await produce_at(settings, topic, partition, [now] * count)
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
