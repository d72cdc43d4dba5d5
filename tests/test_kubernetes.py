"""deploy/kubernetes/ cannot be applied here (no cluster), so the fields that matter are
checked against the code: commands, variable names, the static instance id, ports, probe
paths, the stop grace period against the drain, and KEDA's lag trigger against the
consumer groups, topics and concurrency the workers really use."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream import __version__, topics
from stream.catalog import load_catalog
from stream.cli import build_parser
from stream.config import Settings
from stream.engine.clients import OFFSET_RESET
from stream.observe.health import Health, application
from stream.observe.metrics import Metrics
from stream.stages import Topics
from stream.worker import GROUPS, stop_grace_s

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION: dict[str, Any] = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
DOCUMENTS = [
    doc
    for name in KUSTOMIZATION["resources"]
    for doc in yaml.safe_load_all((FOLDER / name).read_text())
    if doc
]
BY_KIND: dict[tuple[str, str], dict[str, Any]] = {
    (doc["kind"], doc["metadata"]["name"]): doc for doc in DOCUMENTS
}
CONFIG: dict[str, str] = BY_KIND[("ConfigMap", "prediction-stream")]["data"]
STAGES = ("primary", "fallback")
PROVIDER = {"primary": "SYNTHETIC", "fallback": "TOGETHER"}
# what the Apache Kafka scaler reads (keda.sh/docs/latest/scalers/apache-kafka)
KEDA_KAFKA_METADATA = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "excludePersistentLag",
    "limitToPartitionsWithLag",
    "scaleToZeroOnInvalidOffset",
    "version",
    "partitionLimitation",
    "sasl",
    "tls",
}


def _statefulset(stage: str) -> dict[str, Any]:
    return BY_KIND[("StatefulSet", f"prediction-stream-{stage}")]


def _container(stage: str) -> dict[str, Any]:
    (container,) = _statefulset(stage)["spec"]["template"]["spec"]["containers"]
    return container


def _pod_env(stage: str, pod: str, key_file: Path | None = None) -> dict[str, str]:
    """The environment Kubernetes gives the pod named `pod`."""
    env = dict(CONFIG)
    for item in _container(stage)["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name":
            env[item["name"]] = pod
    if key_file is not None:
        env[f"{PROVIDER[stage]}_API_KEY_FILE"] = str(key_file)
    return env


def _settings(stage: str, tmp_path: Path) -> Settings:
    key = tmp_path / "api-key"
    key.write_text("sk-test\n")
    return Settings.from_env(_pod_env(stage, f"prediction-stream-{stage}-0", key))


def test_every_file_is_in_the_kustomization_and_the_image_is_this_version() -> None:
    files = {p.name for p in FOLDER.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(KUSTOMIZATION["resources"]) == files
    (image,) = KUSTOMIZATION["images"]
    assert image["name"] == "prediction-stream" and image["newTag"] == __version__
    for doc in DOCUMENTS:
        if doc["kind"] in ("StatefulSet", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container["image"] == "prediction-stream"


@pytest.mark.parametrize("stage", STAGES)
def test_the_worker_runs_its_stage_with_only_variables_the_settings_read(stage: str) -> None:
    container = _container(stage)
    args = build_parser(container["args"]).parse_args(container["args"])
    assert (args.command, args.stage) == ("run", stage)
    known = Settings.variables()
    names = set(CONFIG) | {item["name"] for item in container["env"]}
    assert names <= known, names - known
    (source,) = container["envFrom"]
    assert source["configMapRef"]["name"] == "prediction-stream"


@pytest.mark.parametrize("stage", STAGES)
def test_the_pod_name_is_the_static_instance_id(stage: str, tmp_path: Path) -> None:
    (item,) = [e for e in _container(stage)["env"] if e["name"] == "STREAM_INSTANCE_ID"]
    assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for ordinal in (0, 1, 99):  # a StatefulSet's pod names: stable, Kafka-valid ids
        pod = f"{_statefulset(stage)['metadata']['name']}-{ordinal}"
        env = _pod_env(stage, pod, tmp_path / "key")
        (tmp_path / "key").write_text("k")
        assert Settings.from_env(env).engine.instance_id == pod


@pytest.mark.parametrize("stage", STAGES)
def test_the_api_key_is_a_file_from_a_secret(stage: str, tmp_path: Path) -> None:
    container = _container(stage)
    (item,) = [e for e in container["env"] if e["name"].endswith("_API_KEY_FILE")]
    assert item["name"] == f"{PROVIDER[stage]}_API_KEY_FILE"  # only the key it needs
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-key"]
    assert item["value"].startswith(mount["mountPath"] + "/") and mount["readOnly"]
    volumes = {v["name"]: v for v in _statefulset(stage)["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mount["name"]]["secret"]["secretName"]
    assert secret == f"prediction-stream-{'synthetic' if stage == 'primary' else 'together'}"
    assert Path(item["value"]).name == "api-key"  # the Secret's key, as the README creates it
    settings = _settings(stage, tmp_path)
    provider = settings.synthetic if stage == "primary" else settings.together
    assert provider.api_key.reveal() == "sk-test"


@pytest.mark.parametrize("stage", STAGES)
def test_ports_and_probes_match_the_worker(stage: str) -> None:
    container = _container(stage)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": int(CONFIG["STREAM_METRICS_PORT"])}
    routes = {r.canonical for r in application(Metrics(), Health()).router.resources()}
    probes = {
        kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
        for kind in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes == {
        "livenessProbe": ("/healthz", "metrics"),
        "readinessProbe": ("/readyz", "metrics"),
        "startupProbe": ("/healthz", "metrics"),
    }
    assert {path for path, _ in probes.values()} <= routes
    # a worker whose liveness fails is killed, and its running calls are paid for again
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60


@pytest.mark.parametrize("stage", STAGES)
def test_termination_grace_covers_the_drain(stage: str, tmp_path: Path) -> None:
    settings = _settings(stage, tmp_path)
    grace = _statefulset(stage)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= stop_grace_s(settings, load_catalog(settings))


@pytest.mark.parametrize("stage", STAGES)
def test_the_pods_run_as_the_images_user(stage: str) -> None:
    user = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user is not None
    spec = _statefulset(stage)["spec"]["template"]["spec"]
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": int(user.group(1))}
    assert _container(stage)["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("stage", STAGES)
def test_the_headless_service_and_the_pod_monitor_find_the_pods(stage: str) -> None:
    statefulset = _statefulset(stage)
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"] == labels
    service = BY_KIND[("Service", statefulset["spec"]["serviceName"])]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == labels

    monitor = BY_KIND[("PodMonitor", "prediction-stream")]["spec"]
    selector = monitor["selector"]
    assert selector["matchLabels"].items() <= labels.items()
    for expression in selector["matchExpressions"]:
        assert expression["operator"] == "In" and labels[expression["key"]] in expression["values"]
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in _container(stage)["ports"]}


def test_the_topics_job_retries_while_kafka_starts() -> None:
    job = BY_KIND[("Job", "prediction-stream-topics")]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = build_parser(container["args"]).parse_args(container["args"])
    assert args.command == "topics" and args.action == "apply" and args.retry_for >= 60
    assert container["envFrom"] == [{"configMapRef": {"name": "prediction-stream"}}]


@pytest.mark.parametrize("stage", STAGES)
def test_keda_scales_on_the_lag_of_the_group_and_topic_the_stage_uses(
    stage: str, tmp_path: Path
) -> None:
    settings = _settings(stage, tmp_path)
    scaled = BY_KIND[("ScaledObject", f"prediction-stream-{stage}")]["spec"]
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": _statefulset(stage)["metadata"]["name"],
    }
    (trigger,) = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka" and set(meta) <= KEDA_KAFKA_METADATA
    assert all(isinstance(value, str) for value in meta.values())  # KEDA wants strings
    assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert meta["consumerGroup"] == settings.group(GROUPS[stage])
    names = Topics.of(settings)
    live = names.requests if stage == "primary" else names.fallback
    assert meta["topic"] == live
    declared = {spec.name: spec for spec in topics.load_specs(settings.topics_dir)}
    # more pods than partitions would sit idle, and never turn ready
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["maxReplicaCount"] <= declared[live].partitions
    # in-flight records are uncommitted, so they count as lag: one pod's worth is no backlog
    assert int(meta["lagThreshold"]) >= settings.engine.max_in_flight
    # scale in no faster than a pod can drain
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    grace = _statefulset(stage)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= grace


def test_keda_counts_a_group_without_commits_as_the_worker_reads_it() -> None:
    """offsetResetPolicy is where a group without commits starts: the engine's choice."""
    for stage in STAGES:
        scaled = BY_KIND[("ScaledObject", f"prediction-stream-{stage}")]["spec"]
        policy = scaled["triggers"][0]["metadata"]["offsetResetPolicy"]
        assert policy == OFFSET_RESET == "earliest"


@pytest.mark.parametrize("stage", STAGES)
def test_the_spend_window_is_kept_in_a_writable_volume(stage: str, tmp_path: Path) -> None:
    """The root filesystem is read-only: STREAM_STATE_DIR must be a volume that outlives
    the container's restarts (an emptyDir), or a restarted worker spends its limit again."""
    container = _container(stage)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    state_dir = str(_settings(stage, tmp_path).spend.state_dir)
    mount = mounts[state_dir]
    assert not mount.get("readOnly")
    volumes = {v["name"]: v for v in _statefulset(stage)["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mount["name"]]
