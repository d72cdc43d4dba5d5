"""`stream bench` end to end on the session's broker: every run present, figures sane.

Not a timed test: it checks the contract people script against, never a speed.
"""

from __future__ import annotations

import json
import pstats
from pathlib import Path
from typing import Any

import pytest

from stream.config import Settings
from stream.devtools.bench import Options
from stream.devtools.scenarios import ScenarioOptions, table, worker_env
from stream.kafka import admin_client
from tests.kit import run_cli

pytestmark = pytest.mark.anyio

CONTRACT = ("throughput", "p50_ms", "p99_ms", "peak_rss_mb")


@pytest.mark.timeout(120)
async def test_bench_json_has_every_run_with_sane_figures(env: dict[str, str]) -> None:
    done = await run_cli(
        env, "bench", "--requests", "200", "--latency", "0.05", "--concurrency", "50", "--json"
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert {"stream", "naive", "bare_http", "passthrough"} <= set(results)
    for name, figures in results.items():
        assert all(key in figures for key in CONTRACT), name
        assert figures["cpu_ms_per_request"] > 0 and figures["rounds"] == 1, name
        assert figures["requests"] == 200, name
        assert figures["throughput"] > 0, name
        assert 0 <= figures["p50_ms"] <= figures["p99_ms"], name
        assert figures["peak_rss_mb"] > 0, name
    # Every request reached the provider once (no faults), except in the run without HTTP.
    assert results["stream"]["calls_per_request"] == 1.0
    assert results["naive"]["calls_per_request"] == 1.0
    assert results["passthrough"]["calls_per_request"] == 0.0
    assert results["stream"]["ratio_naive"] > 0
    # What the answers cost, from the results' own usage and cost_usd.
    assert results["stream"]["spend_usd"] > 0 and results["stream"]["completion_tokens"] > 0


async def _profiled(env: dict[str, str], profiles: Path, *options: str) -> list[str]:
    """A short bench of stream and bare_http, profiled into `profiles`: its lines."""
    done = await run_cli(
        env,
        *("bench", "--latency", "0.05", "--concurrency", "50", "--runs", "stream,bare_http"),
        *("--profile", str(profiles), *options),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.timeout(180)
async def test_bench_repeats_interleaved_with_cpu_per_request_and_profiles(
    env: dict[str, str], tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles"
    lines = await _profiled(env, profiles, "--requests", "300", "--repeat", "2")
    assert "median of 2 interleaved rounds" in lines[0]
    assert any(line.startswith("stream CPU per request vs bare_http ") for line in lines)
    # one profile per run and round, each of sampled stacks ("frame;frame;… count")
    names = sorted(path.name for path in profiles.iterdir())
    assert names == ["bare_http-1.txt", "bare_http-2.txt", "stream-1.txt", "stream-2.txt"]
    for path in profiles.iterdir():
        stacks = path.read_text().splitlines()
        assert stacks and all(line.rpartition(" ")[2].isdigit() for line in stacks), path


@pytest.mark.timeout(180)
async def test_bench_profiles_with_cprofile_and_names_where_the_worker_spends_more(
    env: dict[str, str], tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles"
    lines = await _profiled(env, profiles, "--requests", "200", "--profiler", "cprofile")
    for run in ("stream", "bare_http"):
        calls = pstats.Stats(str(profiles / f"{run}-1.prof")).total_calls  # type: ignore[attr-defined]
        assert calls > 200, run  # the measured interval's calls, every one
    at = next(i for i, line in enumerate(lines) if line.startswith("cProfile, round 1: stream"))
    extra = {line.split("µs")[1].strip() for line in lines[at + 1 :]}
    assert "aiokafka" in extra  # the worker's Kafka client: none in the bare loop


@pytest.mark.timeout(120)
async def test_bench_shows_the_spend_limit_holding(env: dict[str, str]) -> None:
    limit = 0.002
    done = await run_cli(
        env,
        *("bench", "--requests", "200", "--latency", "0.02", "--concurrency", "50"),
        *("--runs", "stream", "--spend-limit", str(limit), "--spend-window", "2", "--json"),
    )
    assert done.returncode == 0, done.stderr
    stream = json.loads(done.stdout)["stream"]
    assert stream["requests"] == 200  # nothing lost
    assert stream["spend_usd"] > 2 * limit  # it took several windows
    assert stream["max_window_spend_usd"] <= limit


async def _groups(env: dict[str, str]) -> list[str]:
    """The consumer groups on the test's broker (a run's topics go with it, its groups stay)."""
    async with admin_client(Settings.from_env(env).kafka, doing="listing groups") as admin:
        return [str(group[0]) for group in await admin.list_consumer_groups()]


@pytest.mark.timeout(120)
async def test_bench_topics_and_groups_go_under_the_operators_prefix(
    env: dict[str, str], prefix: str
) -> None:
    """On a shared cluster prefixed ACLs let the operator use their STREAM_TOPIC_PREFIX only:
    a run's topics and groups go under it (they were bench<id>.…, outside it)."""
    done = await run_cli(
        env, "bench", "--runs", "passthrough", "--requests", "20", "--latency", "0",
        "--concurrency", "10", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert any(group.startswith(f"{prefix}bench") for group in await _groups(env))


def test_naive_run_is_sized_to_a_budget_not_to_n() -> None:
    options = Options(
        requests=100_000,
        latency=1.0,
        concurrency=1000,
        partitions=6,
        runs=("naive",),
        guarantee="at-least-once",
        naive_requests=0,
        json=True,
        spend_limit=None,
        spend_window=60.0,
    )
    assert options.requests_for("naive") < 100
    assert options.requests_for("stream") == 100_000


@pytest.mark.timeout(300)
async def test_a_rolling_restart_of_static_workers_pays_for_no_call_twice(
    env: dict[str, str], prefix: str
) -> None:
    """`stream bench --scenario`: each worker SIGTERMed while its calls run, and started
    again once it drained. Not a timed test: what it checks is what was paid."""
    done = await run_cli(
        env, "bench", "--scenario", "rolling-restart", "--latency", "3", "--requests", "120",
        "--at", "1", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert set(results) == {"undisturbed", "rolling-restart"}
    rolled = results["rolling-restart"]
    assert [text for _, text in rolled["events"]][::3] == ["SIGTERM w0", "SIGTERM w1"]
    assert rolled["calls_per_request"] == 1.0 and rolled["calls_paid_twice"] == 0
    assert rolled["moved_partitions"] == []  # no rebalance: the workers are static members
    # under the operator's STREAM_TOPIC_PREFIX, as every bench run
    assert any(group.startswith(f"{prefix}scen") for group in await _groups(env))


@pytest.mark.timeout(300)
async def test_a_scale_out_pays_for_no_call_twice(env: dict[str, str]) -> None:
    """The partitions balance moves while calls run on them are handed over once those
    calls finish (they may move after the run's last result): nothing is paid twice."""
    done = await run_cli(
        env, "bench", "--scenario", "scale-out", "--latency", "3", "--requests", "300",
        "--at", "1", "--workers", "3", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    scaled = json.loads(done.stdout)["scale-out"]
    # the newcomers took partitions, or were to once the calls on them finished
    assert scaled["moved_partitions"] or scaled["handed_over_partitions"]
    assert scaled["calls_paid_twice"] == 0
    assert scaled["calls"] == 300


def _scenario(folder: Path, **changes: Any) -> ScenarioOptions:
    """A rolling restart of 2 static at-least-once workers, with `changes`."""
    base: dict[str, Any] = {
        "scenario": "rolling-restart",
        "requests": 10,
        "latency": 1.0,
        "workers": 2,
        "concurrency": 10,
        "partitions": 2,
        "at": 1.0,
        "static": True,
        "guarantee": "at-least-once",
        "folder": folder,
        "env": {},
    }
    return ScenarioOptions(**{**base, **changes})


def test_scenario_workers_keep_the_callers_kafka_client_settings(tmp_path: Path) -> None:
    caller = {
        "PATH": "/bin",
        "STREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAM_KAFKA_SASL_USERNAME": "bench",
        "STREAM_GUARANTEE": "exactly-once",
        "STREAM_TOPIC_PREFIX": "theirs.",
    }
    options = _scenario(tmp_path, env=caller)
    env = worker_env(options, "broker:9093", "http://127.0.0.1:1", "scen1.")
    assert env["STREAM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["STREAM_KAFKA_SASL_USERNAME"] == "bench"
    assert env["PATH"] == "/bin"
    # The scenario's own settings win over the caller's.
    assert env["STREAM_GUARANTEE"] == "at-least-once"
    assert env["STREAM_TOPIC_PREFIX"] == "scen1."
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "broker:9093"


def test_a_scenario_whose_events_came_after_the_work_says_it_disturbed_nothing(
    tmp_path: Path,
) -> None:
    """`--at 5` with calls of 5 s: the first SIGTERM came after the last result, and the
    report said "0 paid twice" as if the restart had been tried under load."""
    options = _scenario(tmp_path, requests=600, latency=5.0, at=5.0)
    figures = {
        "calls_per_request": 1.0,
        "calls_paid_twice": 0,
        "abandoned_on_moved": 0,
        "longest_stop_s": 0.1,
        "longest_pause_s": 0.0,
        "longest_pause_staying_s": 0.0,
    }
    late = {**figures, "total_s": 5.8, "events": [(6.0, "SIGTERM w0")]}
    lines = table({"undisturbed": {**figures, "total_s": 5.8}, "rolling-restart": late}, options)
    assert lines[-1].startswith("note: the events began at 6 s, after the last result (5.8 s)")
    early = {**late, "events": [(2.0, "SIGTERM w0")]}
    lines = table({"undisturbed": {**figures, "total_s": 5.8}, "rolling-restart": early}, options)
    assert not lines[-1].startswith("note:")
