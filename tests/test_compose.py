"""docker-compose.yml cannot be run here (no Docker engine), so it is checked instead:
it parses, every command it runs is a real `stream` command line, every variable it sets
is one the settings read, and its ports, scrape targets and mounted files line up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.cli import build_parser
from stream.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
OURS = {name: s for name, s in SERVICES.items() if s.get("image") == "prediction-stream:latest"}


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
    for variable in OURS[name].get("environment", {}):
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
    from stream.devtools.broker import KAFKA_VERSION

    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY topics" in dockerfile and "STREAM_TOPICS_DIR" in dockerfile
