"""docker-compose.yml cannot be run here (no Docker engine), so it is checked instead:
it is valid against the compose specification's JSON schema, every command it runs is a
real `stream` command line, every variable it sets is one the settings read, secrets can
come from files, the stop grace period covers the drain, and its ports, scrape targets
and mounted files line up."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from stream.catalog import load_catalog
from stream.cli import build_parser
from stream.config import Settings
from stream.worker import stop_grace_s

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SECRETS: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.secrets.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
OURS = {name: s for name, s in SERVICES.items() if s.get("image") == "prediction-stream:latest"}
WORKERS = ("primary", "fallback")


def test_our_services_are_the_pipeline() -> None:
    assert {"topics", "primary", "fallback", "simulator"} <= set(OURS)
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")


@pytest.mark.parametrize("name", sorted(OURS))
def test_every_command_is_a_valid_stream_command_line(name: str) -> None:
    command = OURS[name]["command"]
    args = build_parser(command).parse_args(command)  # exits (fails the test) on a bad command line
    assert callable(args.handler)


@pytest.mark.parametrize("name", sorted(OURS))
def test_every_variable_is_one_the_settings_read(name: str) -> None:
    known = Settings.variables()
    overlay = SECRETS["services"].get(name, {}).get("environment", {})
    for variable in [*OURS[name].get("environment", {}), *overlay]:
        assert variable in known, f"{name} sets {variable}, which nothing reads"


def test_metrics_ports_and_scrape_targets_line_up() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t
        for job in prometheus["scrape_configs"]
        for c in job["static_configs"]
        for t in c["targets"]
    }
    for stage in ("primary", "fallback"):
        port = OURS[stage]["environment"]["STREAM_METRICS_PORT"]
        assert f"{stage}:{port}" in targets
        assert any(mapping.endswith(f":{port}") for mapping in OURS[stage]["ports"])
        assert OURS[stage]["command"] == ["run", stage]


def test_simulator_listens_where_it_is_published() -> None:
    command = OURS["simulator"]["command"]
    port = command[command.index("--port") + 1]
    assert command[command.index("--host") + 1] == "0.0.0.0"  # reachable from other containers
    assert f"{port}:{port}" in OURS["simulator"]["ports"]


def test_mounted_files_exist_and_kafka_matches_the_pinned_broker() -> None:
    from stream.devtools.jars import KAFKA_VERSION

    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    # the image is the wheel (which carries topics/, read through stream/data/topics)
    assert "COPY topics" in dockerfile and "pip wheel" in dockerfile
    assert "STREAM_TOPICS_DIR" not in dockerfile


# -- the compose specification ---------------------------------------------------------------

# tests/fixtures/compose-spec.json: the compose-spec project's schema (see the README there)
SPEC = jsonschema.Draft7Validator(
    json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text())
)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.secrets.yml"])
def test_the_files_are_valid_compose(name: str) -> None:
    document = yaml.safe_load((ROOT / name).read_text())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in SPEC.iter_errors(document)
    ]
    assert errors == []


def test_the_schema_does_catch_mistakes() -> None:
    """The check above can fail: the same schema refuses what compose would refuse."""
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["primary"]["stop_grace_period"] = 150  # a number, not a duration
    broken["services"]["fallback"]["helthcheck"] = {}
    broken["services"]["topics"]["depends_on"]["kafka"]["condition"] = "service_ready"
    assert len(list(SPEC.iter_errors(broken))) == 3


# -- what compose hands a container ----------------------------------------------------------

_REFERENCE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def container_env(service: dict[str, Any], shell: dict[str, str]) -> dict[str, str]:
    """The environment compose gives a container: `${X:-d}` and `${X}` from the shell, and
    a variable without a value passed on only when the shell has it (else unset)."""
    env: dict[str, str] = {}
    for name, value in service.get("environment", {}).items():
        if value is None:
            if name in shell:
                env[name] = shell[name]
            continue
        env[name] = _REFERENCE.sub(
            lambda m: shell.get(m.group(1)) or (m.group(2) or ""), str(value)
        )
    return env


def _merged(service: str) -> dict[str, Any]:
    """A worker with docker-compose.secrets.yml laid over it (compose merges maps)."""
    merged = copy.deepcopy(OURS[service])
    overlay = SECRETS["services"][service]
    merged["environment"] = {**merged["environment"], **overlay["environment"]}
    merged["secrets"] = overlay["secrets"]
    return merged


@pytest.mark.parametrize(
    ("stage", "provider"), [("primary", "synthetic"), ("fallback", "together")]
)
def test_api_keys_come_from_the_shell_or_from_secret_files(
    stage: str, provider: str, tmp_path: Path
) -> None:
    name = f"{provider.upper()}_API_KEY"
    from_shell = Settings.from_env(container_env(OURS[stage], {name: "sk-from-shell"}))
    assert getattr(from_shell, provider).api_key.reveal() == "sk-from-shell"
    nothing = container_env(OURS[stage], {})
    assert name not in nothing and f"{name}_FILE" not in nothing

    # the overlay names a file under /run/secrets: compose mounts the secret there
    worker = _merged(stage)
    env = container_env(worker, {})
    (secret,) = worker["secrets"]
    assert env[f"{name}_FILE"] == f"/run/secrets/{secret}"
    assert SECRETS["secrets"][secret]["file"].startswith("./secrets/")
    key = tmp_path / secret
    key.write_text("sk-from-a-file\n")
    settings = Settings.from_env({**env, f"{name}_FILE": str(key)})
    assert getattr(settings, provider).api_key.reveal() == "sk-from-a-file"


def test_kafka_keeps_its_data_on_the_volume() -> None:
    kafka = SERVICES["kafka"]
    mounts = dict(volume.split(":")[:2] for volume in kafka["volumes"])
    assert "kafka-data" in COMPOSE["volumes"]
    assert kafka["environment"]["KAFKA_LOG_DIRS"] == mounts["kafka-data"]
    # a KRaft cluster id: 16 bytes in URL-safe base64, fixed so the volume is formatted once
    cluster_id = kafka["environment"]["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def seconds(duration: str) -> float:
    """A compose duration (`1m30s`, `150s`) in seconds."""
    parts = _DURATION.findall(duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * _UNIT[u] for n, u in parts)


@pytest.mark.parametrize("stage", WORKERS)
def test_the_stop_grace_period_covers_the_drain(stage: str) -> None:
    settings = Settings.from_env(container_env(OURS[stage], {}))
    needed = stop_grace_s(settings, load_catalog(settings))
    assert seconds(OURS[stage]["stop_grace_period"]) >= needed
    # and an explicit cap in the shell is honoured the same way
    capped = Settings.from_env({**container_env(OURS[stage], {}), "STREAM_SHUTDOWN_GRACE_S": "30"})
    assert stop_grace_s(capped, load_catalog(capped)) < needed


@pytest.mark.parametrize("stage", WORKERS)
def test_workers_are_health_checked_on_healthz_and_readyz(stage: str) -> None:
    check = OURS[stage]["healthcheck"]
    command = " ".join(check["test"])
    assert check["test"][0] == "CMD" and "/healthz" in command and "/readyz" in command
    assert "STREAM_METRICS_PORT" in command
    # a slow start (Kafka still electing, the first assignment) is not a failed check
    assert seconds(check["start_period"]) >= 30


def test_the_topics_service_rides_out_a_broker_still_starting() -> None:
    topics = OURS["topics"]
    args = build_parser(topics["command"]).parse_args(topics["command"])
    assert args.retry_for >= 60
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    for stage in WORKERS:
        condition = OURS[stage]["depends_on"]["topics"]["condition"]
        assert condition == "service_completed_successfully"
