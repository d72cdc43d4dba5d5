"""The pipeline on a three-broker cluster (replication 3, min.insync.replicas 2) while
brokers die: partition leaders killed under load, one broker gone for good, two gone.

The cluster (the `local_cluster` fixture: three brokers, three controllers) serves the
whole session, started only when a test marked `cluster` runs; each test puts back whatever
it stopped. These tests kill its processes, so they always run on their own local cluster,
even when KAFKA_BOOTSTRAP_SERVERS names another (`-m "not cluster"` leaves them out).
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import orjson
import pytest
from aiokafka import TopicPartition

from stream.config import Settings
from stream.devtools.cluster import LocalCluster, describe_partitions
from stream.devtools.faults import parse_faults, parse_latency
from stream.devtools.simulator import SimConfig, Simulator
from stream.stages import Topics
from stream.worker import Worker
from tests.kit import eventually, run_cli
from tests.kit.cluster import BROKERS, in_sync, leader, send, start, stop
from tests.kit.kafka import read_all, topic_configs
from tests.kit.workers import simulator_env, worker_on

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

FAULTS = "hf:moonshotai/Kimi-K2-Thinking=rate:1:503"  # the fallback stage works too


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
            simulator_env(
                env,
                sim,
                STREAM_GUARANTEE=guarantee,
                STREAM_MAX_IN_FLIGHT="40",
                STREAM_SYNTHETIC_MAX_RETRIES="1",
            )
        )
        worker = Worker(settings, ("primary", "fallback"), lag_interval_s=1.0)
        async with worker_on(worker):
            yield Pipeline(settings, worker, sim)


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
    try:
        await progress(p, 20)  # while it is still down
    except TimeoutError:
        # Once in many CI runs on a loaded machine the stages stalled here (NotEnoughReplicas
        # in the log): say whether the cluster itself was below min.insync.replicas.
        internal = ["__consumer_offsets", "__transaction_state"]
        states = await describe_partitions(p.settings.kafka, p.topics() + internal)
        short = {str(tp): state for tp, state in states.items() if len(state.isr) < 2}
        raise AssertionError(
            f"no progress in 60 s with broker {dead} down; partitions below 2 in sync: "
            f"{short or 'none'}"
        ) from None
    await start(cluster, cluster.broker(dead))
    await in_sync(p.settings, p.topics(), BROKERS)
    return dead


# -- (a) leaders killed under load ----------------------------------------------------


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
async def test_pipeline_goes_on_while_partition_leaders_are_killed(
    cluster: LocalCluster, cluster_env: dict[str, str], guarantee: str
) -> None:
    sent = range(0)
    kills_done = anyio.Event()

    async def feed() -> None:  # the load, for as long as the kills take
        nonlocal sent
        sent = await send(p.settings, range(10**6), per_second=16, until=kills_done)

    async with pipeline(cluster_env, guarantee) as p:
        names = Topics.of(p.settings)
        async with anyio.create_task_group() as group:
            group.start_soon(feed)
            await progress(p, 30)
            await kill_leader_under_load(p, cluster, TopicPartition(names.requests, 0))
            await kill_leader_under_load(p, cluster, TopicPartition(names.results, 1))
            kills_done.set()
        counts = await all_answered(p.settings, sent)

    missing = [rid for rid in (f"r-{i}" for i in sent) if counts[rid] == 0]
    stray = set(counts) - {f"r-{i}" for i in sent}
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
    configs = [await topic_configs(p.settings, name) for name in p.topics()]
    assert {c["min.insync.replicas"] for c in configs} == {"2"}


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
    # Calls take 10 s: the brokers die while they run, and their outputs find one replica.
    # On a loaded machine stopping two took over 8 s once, and some answers found them
    # alive: those finish (their requests are left out below), the rest must wait.
    async with pipeline(cluster_env, guarantee, latency="10") as p:
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
        finished = primary.snapshot().records_done  # outputs acknowledged before they died
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

        assert primary.snapshot().records_done == finished  # seconds later, nothing more
        assert primary.problem() is not None
        written = set(await terminal_counts(p.settings)) & {f"r-{i}" for i in ids}
        assert len(written) <= finished  # only what finished before

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
