"""The Grafana dashboard: grafana/dashboard-linter's rules, and every panel's query answered
by a real Prometheus that scrapes a real worker.

The linter itself is a Go module the Go module proxy does not serve (403 for
github.com/grafana/dashboard-linter), so the rules of its default set that apply to this
dashboard are enforced here: a `datasource` variable; `job` and `instance` query variables
on it (label "Job"/"Instance", multi-select, all value ".+", refreshed on time change);
panels on `${datasource}` with a title, a description and a valid unit; every selector
matching `job=~"$job"` and `instance=~"$instance"`; every `rate` over `$__rate_interval`;
counters (`_total`) only inside rate/irate/increase. PromQL syntax is checked by
Prometheus itself in the second test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
import yaml

from stream.config import Settings
from stream.devtools.broker import free_port
from stream.devtools.faults import parse_faults
from stream.devtools.simulator import SimConfig, Simulator
from stream.worker import Worker
from tests.kit import ROOT, eventually
from tests.kit.kafka import Record, produce, read_all
from tests.kit.requests import request
from tests.kit.workers import BOTH, simulated_settings, worker_on

pytestmark = pytest.mark.anyio

DASHBOARD: dict[str, Any] = orjson.loads(
    (ROOT / "deploy" / "grafana" / "prediction-stream.json").read_bytes()
)
PANELS: list[dict[str, Any]] = DASHBOARD["panels"]
EXPRS = [target["expr"] for panel in PANELS for target in panel["targets"]]
# Grafana's units (the linter's list holds these and many more)
UNITS = {"short", "none", "s", "ms", "reqps", "ops", "percentunit", "bytes", "currencyUSD"}
SELECTOR = re.compile(r"\b((?:stream|kafka)_[a-z_]+)(\{[^}]*\})?")


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in DASHBOARD["templating"]["list"]}


# --- the linter's rules ------------------------------------------------------------------


def test_datasource_job_and_instance_variables() -> None:
    found = variables()
    source = found["datasource"]
    assert (source["type"], source["query"], source["label"]) == (
        "datasource",
        "prometheus",
        "Data source",
    )
    for name in ("job", "instance"):
        variable = found[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] in ("$datasource", "${datasource}")
        assert variable["label"] == name.title()
        assert variable["multi"] is True and variable["allValue"] == ".+"
        assert variable["refresh"] == 2  # on time range change
        assert re.fullmatch(r"label_values\(.+, " + name + r"\)", variable["query"])


def test_panels_have_datasource_title_description_unit_and_targets() -> None:
    for panel in PANELS:
        name = panel["title"]
        assert panel["datasource"]["uid"] in ("$datasource", "${datasource}"), name
        assert panel["title"] and panel["description"], name
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, name
        assert panel["targets"], name
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", name


@pytest.mark.parametrize("expr", EXPRS)
def test_every_selector_matches_job_and_instance(expr: str) -> None:
    selectors = SELECTOR.findall(expr)
    assert selectors
    for metric, matchers in selectors:
        assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, metric


@pytest.mark.parametrize("expr", EXPRS)
def test_ranges_are_the_rate_interval_and_counters_are_rated(expr: str) -> None:
    assert set(re.findall(r"\[([^\]]*)\]", expr)) <= {"$__rate_interval"}
    for match in re.finditer(r"\b\w+_total\{", expr):
        assert re.search(r"\b(rate|irate|increase)\($", expr[: match.start()]), expr


def test_time_since_a_timestamp_ignores_the_zero_before_the_first() -> None:
    """`time() - 0` is 56 years: a timestamp that is 0 until something happens is filtered."""
    for expr in EXPRS:
        if "time() -" in expr and "last_commit" in expr:
            assert re.search(r"_timestamp_seconds\{[^}]*\} > 0\)", expr), expr


# --- every panel answered by a real Prometheus ---------------------------------------------


PROMETHEUS = shutil.which("prometheus")
FAULTS = "hf:moonshotai/Kimi-K2-Thinking=rate:1:503;hf:zai-org/GLM-4.6=rate:1:500"


def concrete(expr: str, job: str) -> str:
    """What Grafana sends: the variables and the rate interval filled in."""
    return expr.replace("$job", job).replace("$instance", ".+").replace("$__rate_interval", "20s")


@asynccontextmanager
async def prometheus(tmp_path: Path, target: str, job: str) -> AsyncIterator[httpx.AsyncClient]:
    assert PROMETHEUS
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = await anyio.open_process(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/-/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout_s=60)
            yield client
    finally:
        process.terminate()
        with anyio.move_on_after(10):
            await process.wait()


async def query(client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/query", params={"query": expr, "time": time.time()})
    body = response.json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def mixed_requests() -> Iterator[bytes]:
    """Answered, handed to the fallback (Kimi is down on Synthetic), dead-lettered."""
    models = ["deepseek-r1-0528-syn", "kimi-k2-thinking-syn", "glm-4.6-syn"]
    for i in range(30):
        model = models[i % len(models)]
        yield request(f"r{i}", model, "hi")
    yield b"{not json"


@pytest.mark.skipif(not PROMETHEUS, reason="needs Prometheus (./dev test installs it)")
@pytest.mark.timeout(240)
async def test_every_panel_query_returns_series_from_a_real_worker(
    env: dict[str, str], tmp_path: Path
) -> None:
    job = "prediction-stream"
    async with Simulator(SimConfig(faults=parse_faults(FAULTS))) as sim:
        settings = simulated_settings(env, sim, max_in_flight=50)
        async with worker_on(Worker(settings, BOTH, lag_interval_s=0.5)) as worker:
            inputs = list(mixed_requests())
            await produce(
                settings,
                settings.topic("predictions.requests"),
                [Record(value, partition=i % 2) for i, value in enumerate(inputs)],
            )
            await eventually(_terminal(settings, len(inputs)), timeout_s=90)
            async with prometheus(tmp_path, f"127.0.0.1:{worker.port}", job) as client:
                # every panel: once the series have a few scrapes, each query answers
                missing: list[str] = []

                async def answered() -> bool:
                    missing[:] = [e for e in EXPRS if not await query(client, concrete(e, job))]
                    return not missing

                try:
                    await eventually(answered, timeout_s=60)
                except TimeoutError:
                    pytest.fail(f"no series for {missing}")
                since_commit = await query(client, concrete(_since_commit(), job))
    for series in since_commit:
        assert float(series["value"][1]) < 3600  # seconds, not 56 years


def _since_commit() -> str:
    (expr,) = [e for e in EXPRS if "last_commit" in e]
    return expr


def _terminal(settings: Settings, count: int) -> Any:
    async def check() -> bool:
        found = 0
        for name in ("predictions.results", "predictions.dead-letter"):
            found += len(await read_all(settings, settings.topic(name)))
        return found >= count

    return check
