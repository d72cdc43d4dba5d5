from __future__ import annotations

import io
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import orjson
import pytest
import yaml
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from stream.config import Settings
from stream.logs import JsonFormatter
from stream.observe.health import Health, serve
from stream.observe.lag import LagMonitor, LagRow, Status
from stream.observe.lagmetrics import exported_groups
from stream.observe.metrics import MAX_LABEL_VALUES, Metrics
from tests.kit import ROOT
from tests.kit.fakes import FakeEngine, PartitionSnapshot
from tests.kit.kafka import commit, create_topic, produce
from tests.kit.lag import live_member, stamped

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text scrape, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@asynccontextmanager
async def server(metrics: Metrics, health: Health) -> AsyncIterator[httpx.AsyncClient]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve, metrics, health, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
        tg.cancel_scope.cancel()


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def test_scrape_parses_and_counters_move() -> None:
    metrics = Metrics()
    engine = FakeEngine("primary", "predictions-primary")
    metrics.watch_engine(engine)
    async with server(metrics, Health()) as client:
        before = await scrape(client)
        metrics.record_outcome("primary", "result")
        metrics.record_outcome("primary", "result")
        metrics.record_outcome("fallback", "dead_letter", "fallback_failed")
        metrics.record_fallback("deepseek-r1-0528-syn", "deepseek-r1")
        metrics.on_attempt("synthetic", "hf:deepseek-ai/DeepSeek-R1-0528", "2xx", 42.0)
        metrics.on_attempt("synthetic", "hf:deepseek-ai/DeepSeek-R1-0528", "5xx", 0.2)
        metrics.on_retry("synthetic", "hf:deepseek-ai/DeepSeek-R1-0528", "server_error")
        metrics.on_breaker("synthetic", "hf:deepseek-ai/DeepSeek-R1-0528", "open")
        metrics.observe_commit("predictions-primary", 0.004)
        engine.state = engine.state._replace(
            records_in=7, records_done=5, commits=3, assigned=2, rebalances=2, abandoned=9
        )
        after = await scrape(client)

    model = {"provider": "synthetic", "model": "hf:deepseek-ai/DeepSeek-R1-0528"}
    assert not any(name == "stream_records_total" for name, _ in before)
    result = {"stage": "primary", "outcome": "result", "reason": ""}
    assert value(after, "stream_records_total", **result) == 2
    dead = {"stage": "fallback", "outcome": "dead_letter", "reason": "fallback_failed"}
    assert value(after, "stream_records_total", **dead) == 1
    fallback = {"from_model": "deepseek-r1-0528-syn", "to_model": "deepseek-r1"}
    assert value(after, "stream_fallbacks_total", **fallback) == 1
    duration = "stream_provider_request_duration_seconds"
    assert value(after, f"{duration}_count", **model, status_class="2xx") == 1
    assert value(after, f"{duration}_bucket", **model, status_class="2xx", le="30.0") == 0
    assert value(after, f"{duration}_bucket", **model, status_class="2xx", le="60.0") == 1
    assert value(after, "stream_provider_retries_total", **model, error_type="server_error") == 1
    assert value(after, "stream_breaker_state", **model, state="open") == 1
    assert value(after, "stream_breaker_state", **model, state="closed") == 0
    assert value(after, "stream_breaker_state", **model, state="half_open") == 0
    assert value(after, "stream_commit_duration_seconds_count", group="predictions-primary") == 1
    engine_labels = {"engine": "primary", "group": "predictions-primary"}
    assert value(before, "stream_engine_records_in_total", **engine_labels) == 0
    assert value(after, "stream_engine_records_in_total", **engine_labels) == 7
    assert value(after, "stream_engine_commits_total", **engine_labels) == 3
    assert value(after, "stream_engine_assigned_partitions", **engine_labels) == 2
    assert value(after, "stream_engine_rebalances_total", **engine_labels) == 2
    assert value(after, "stream_engine_records_abandoned_total", **engine_labels) == 9
    assert all(name.startswith("stream_") for name, _ in after)
    assert not [name for name, _ in after if name.endswith("_created")]


def test_a_called_model_shows_its_breaker_closed_before_any_transition() -> None:
    metrics = Metrics()
    metrics.on_attempt("together", "m", "2xx", 1.0)
    samples = parse(metrics.exposition().decode())
    states = {
        dict(labels)["state"]: v for (name, labels), v in samples.items() if name.endswith("state")
    }
    assert states == {"closed": 1, "open": 0, "half_open": 0}


async def test_partition_snapshot_metrics_show_unknown_age_as_nan() -> None:
    metrics = Metrics()
    engine = FakeEngine("primary", "g")
    now_ms = int(time.time() * 1000)
    engine.state = engine.state._replace(
        partitions=(
            PartitionSnapshot("t", 0, 3, 120, 2, False, now_ms - 60_000),
            PartitionSnapshot("t", 1, 0, 40, 0, True, None),
        )
    )
    metrics.watch_engine(engine)
    samples = parse(metrics.exposition().decode())

    p0 = {"engine": "primary", "topic": "t", "partition": "0"}
    p1 = {**p0, "partition": "1"}
    assert value(samples, "stream_partition_in_flight", **p0) == 3
    assert value(samples, "stream_partition_finished_uncommitted", **p0) == 2
    assert value(samples, "stream_partition_paused", **p1) == 1
    assert 59 <= value(samples, "stream_partition_oldest_in_flight_age_seconds", **p0) < 3600
    assert math.isnan(value(samples, "stream_partition_oldest_in_flight_age_seconds", **p1))


async def test_lag_metrics_carry_kafka_lag_exporter_names_from_the_monitor_cache(
    settings: Settings,
) -> None:
    topic = await create_topic(settings, "metrics.lag", 2)
    old = int(time.time() * 1000) - 120_000
    await produce(settings, topic, stamped(0, [old] * 4))
    group = settings.group("metrics")
    await commit(settings, group, {TopicPartition(topic, 0): 1})
    metrics = Metrics()
    monitor = LagMonitor(settings.kafka, [group], interval_s=0.05)
    metrics.watch_lag(monitor)  # no `owned`: this process exports every group it reads
    async with live_member(settings, group, topic), anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        with anyio.fail_after(30):
            await monitor.next_round()
        tg.cancel_scope.cancel()
    samples = parse(metrics.exposition().decode())

    cluster = monitor.cluster_name
    assert cluster  # the cluster id Kafka reports, without STREAM_KAFKA_CLUSTER_NAME
    p0 = {"cluster_name": cluster, "group": group, "topic": topic, "partition": "0"}
    p1 = {**p0, "partition": "1"}
    assert value(samples, "kafka_consumergroup_group_lag", **p0) == 3
    assert 119 <= value(samples, "kafka_consumergroup_group_lag_seconds", **p0) < 3600
    assert value(samples, "kafka_consumergroup_group_offset", **p0) == 1
    assert math.isnan(value(samples, "kafka_consumergroup_group_offset", **p1))  # never committed
    assert value(samples, "kafka_consumergroup_group_lag", **p1) == 0  # empty: known zero
    assert value(samples, "stream_consumer_lag_status", **p1, status="OK") == 1
    group_labels = {"cluster_name": cluster, "group": group}
    assert value(samples, "kafka_consumergroup_group_max_lag", **group_labels) == 3
    assert value(samples, "kafka_consumergroup_group_sum_lag", **group_labels) == 3
    latest = {"cluster_name": cluster, "topic": topic, "partition": "0"}
    assert value(samples, "kafka_partition_latest_offset", **latest) == 4
    assert value(samples, "stream_lag_exporter", group=group) == 1
    assert value(samples, "stream_lag_rounds_total") >= 1


def row(group: str, partition: int, owner: str | None) -> LagRow:
    return LagRow(group, "t", partition, 0, 0, 0, 0.0, Status.OK, 2, owner)


@given(
    st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=12),
    st.sampled_from(["g1", "g2"]),
)
def test_exactly_one_member_exports_a_group_with_live_owners(
    owners: list[str | None], group: str
) -> None:
    rows = [row(group, p, owner) for p, owner in enumerate(owners)]
    holders = {
        member: {(group, "t", p) for p, o in enumerate(owners) if o == member} for member in "abc"
    }
    exporters = [member for member in "abc" if exported_groups(rows, holders[member])]
    assert len(exporters) == (1 if any(owners) else 0)


def test_a_replica_holding_other_partitions_exports_nothing_of_the_group() -> None:
    rows = [row("g", 0, "a"), row("g", 1, "b")]
    assert exported_groups(rows, {("g", "t", 1)}) == set()
    assert exported_groups(rows, {("g", "t", 0)}) == {"g"}


async def test_readyz_fails_until_partitions_are_assigned_and_kafka_answered(
    settings: Settings,
) -> None:
    engine = FakeEngine("primary", "g")
    monitor = LagMonitor(settings.kafka, [settings.group("ready")], interval_s=0.05)
    health = Health()
    health.require_engine(engine)
    health.require_kafka(monitor)
    async with server(Metrics(), health) as client, anyio.create_task_group() as tg:
        assert (await client.get("/healthz")).status_code == 200
        first = await client.get("/readyz")
        await tg.start(monitor.run)
        with anyio.fail_after(30):
            await monitor.next_round()
        second = await client.get("/readyz")
        engine.ready.set()
        third = await client.get("/readyz")
        tg.cancel_scope.cancel()

    assert first.status_code == 503
    assert "engine primary: partitions not assigned yet" in first.text
    assert "kafka: Kafka not reached yet" in first.text
    assert second.status_code == 503 and "kafka" not in second.text
    assert third.status_code == 200 and third.text == "ready\n"


async def test_unreachable_kafka_keeps_readyz_failing_with_the_reason() -> None:
    from stream.config import KafkaSettings
    from stream.devtools.broker import free_port

    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=1000)
    monitor = LagMonitor(kafka, ["g"], interval_s=0.05)
    engine = FakeEngine("primary", "g")
    engine.ready.set()
    health = Health()
    health.require_engine(engine)
    health.require_kafka(monitor)
    async with anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        with anyio.fail_after(30):
            await monitor.next_round()
        tg.cancel_scope.cancel()
    (failure,) = health.failing()
    assert failure.startswith("kafka: cannot reach Kafka")


def test_no_check_means_not_ready() -> None:
    assert Health().failing() != []


def test_label_values_are_bounded_and_cleaned() -> None:
    metrics = Metrics()
    for i in range(MAX_LABEL_VALUES + 50):
        metrics.on_retry("synthetic", "m", f"error_{i}")
    metrics.on_attempt("synthetic", "m", "teapot", 1.0)
    metrics.record_outcome("primary", "dead_letter", "bad reason\nwith newline")
    samples = parse(metrics.exposition().decode())

    kinds = {
        dict(labels)["error_type"] for name, labels in samples if name.endswith("retries_total")
    }
    assert len(kinds) == MAX_LABEL_VALUES + 1 and "other" in kinds
    assert (
        value(
            samples,
            "stream_provider_request_duration_seconds_count",
            provider="synthetic",
            model="m",
            status_class="other",
        )
        == 1
    )
    reasons = {
        dict(labels).get("reason") for name, labels in samples if name == "stream_records_total"
    }
    assert reasons == {"bad_reason_with_newline"}


def test_outcomes_and_breaker_states_are_checked() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError):
        metrics.record_outcome("primary", "req-123")
    with pytest.raises(ValueError):
        metrics.on_breaker("synthetic", "m", "ajar")


def test_registry_is_not_the_global_one() -> None:
    from prometheus_client import REGISTRY

    assert Metrics().registry is not REGISTRY
    Metrics()  # a second instance must not collide with the first


def test_log_lines_are_json_with_request_id_and_stage_from_extra() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("stream.test_metrics")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("done in %d ms", 12, extra={"request_id": "req-1", "stage": "primary"})
    finally:
        logger.removeHandler(handler)

    (line,) = stream.getvalue().splitlines()
    entry = orjson.loads(line)
    assert entry["msg"] == "done in 12 ms"
    assert (entry["request_id"], entry["stage"], entry["level"]) == ("req-1", "primary", "info")
    assert entry["logger"] == "stream.test_metrics"


def exposed_names() -> set[str]:
    """Every sample name the registry can expose, including families that are empty now."""
    metrics = Metrics()
    metrics.watch_engine(FakeEngine("primary", "g"))
    names = set()
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def test_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = orjson.loads((ROOT / "deploy" / "grafana" / "prediction-stream.json").read_bytes())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bstream_[a-z_]+", expr)}
    exposed = exposed_names()
    assert len(used) >= 15
    assert used <= exposed, used - exposed


def test_prometheus_scrapes_both_workers() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {"primary:9400", "fallback:9400"}
    # a target label named like a metric label would rename the metric's own label
    metric_labels = {"stage", "outcome", "reason", "engine", "group", "topic", "partition"}
    assert (
        not {k for group in job["static_configs"] for k in group.get("labels", {})} & metric_labels
    )


def readme_metrics() -> dict[str, str]:
    """Every metric the README's metrics table lists → its type."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| metric | type | labels | what |") :].split("\n\n")[0]
    listed = {}
    for line in table.splitlines()[2:]:
        names, kind = line.split("|")[1:3]
        for name in re.findall(r"`([a-z_]+)`", names):
            listed[name] = kind.strip()
    return listed


def test_the_readme_lists_every_metric_with_its_type() -> None:
    metrics = Metrics()
    metrics.watch_engine(FakeEngine("primary", "g"))
    metrics.watch_lag(LagMonitor(Settings().kafka, ["g"]))
    exposed = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        exposed[name] = family.type
    assert readme_metrics() == exposed
