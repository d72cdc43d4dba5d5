"""The pipeline end to end: real broker, both stages, the simulator over HTTP."""

from __future__ import annotations

import base64
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import jsonschema
import orjson
import pytest

from stream import topics
from stream.config import Settings
from stream.devtools.faults import parse_faults, parse_latency
from stream.devtools.simulator import SimConfig, Simulator
from stream.worker import Worker
from tests.kit import eventually, run_cli
from tests.kit.kafka import Record, produce, read_all
from tests.kit.requests import request, send, terminal
from tests.kit.workers import BOTH, simulator_env, worker_on, worker_process

pytestmark = pytest.mark.anyio

# Synthetic's Kimi-K2-Thinking and GLM-4.6 are down; Together's models are up.
FAULTS = "hf:moonshotai/Kimi-K2-Thinking=rate:1:503;hf:zai-org/GLM-4.6=rate:1:500"
TRACE = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SCHEMAS = {
    name: jsonschema.Draft7Validator(
        orjson.loads((Settings().topics_dir / f"{name}.schema.json").read_bytes()),
        format_checker=jsonschema.FormatChecker(),
    )
    for name in ("result", "dead-letter", "fallback")
}


# One retry per provider and a short breaker cool-down: an outage ends within a test.
ONE_RETRY = {
    "STREAM_SYNTHETIC_MAX_RETRIES": "1",
    "STREAM_TOGETHER_MAX_RETRIES": "1",
    "STREAM_SYNTHETIC_BREAKER_COOLDOWN_S": "1",
    "STREAM_TOGETHER_BREAKER_COOLDOWN_S": "1",
}


def simulated(env: dict[str, str], sim: Simulator, **more: str) -> Settings:
    return Settings.from_env(simulator_env(env, sim, **ONE_RETRY, **more))


@asynccontextmanager
async def running(env: dict[str, str]) -> AsyncIterator[Worker]:
    """The simulator up (with FAULTS), and both stages running in this process."""
    async with Simulator(SimConfig(faults=parse_faults(FAULTS))) as sim:
        async with worker_on(Worker(simulated(env, sim), BOTH)) as worker:
            yield worker


# The widest integers a request carries exactly: orjson's range.
WIDE = {"max": 2**64 - 1, "min": -(2**63)}


async def test_every_request_ends_as_exactly_one_right_terminal_record(env: dict[str, str]) -> None:
    cases = {
        "ok-r1": (request("ok-r1", "deepseek-r1-0528-syn"), "synthetic"),
        "ok-v3": (
            request("ok-v3", "deepseek-v3-0324-syn", metadata={"team": "search"}),
            "synthetic",
        ),
        "fb-kimi": (request("fb-kimi", "kimi-k2-thinking-syn"), "together"),
        "nofb-glm": (request("nofb-glm", "glm-4.6-syn"), "no_fallback"),
        "both-fail": (
            request("both-fail", "deepseek-r1-0528-syn", "[[sim:500]] hi"),
            "fallback_failed",
        ),
        "unknown": (request("unknown", "gpt-17-syn"), "unknown_model"),
        "expired": (
            request("expired", "deepseek-r1-0528-syn", deadline="2020-01-01T00:00:00Z"),
            "expired",
        ),
        "garbage": (b"\xff\xfenot json at all", "invalid_encoding"),
        "wrong-types": (
            orjson.dumps({"request_id": "wrong-types", "model": 5, "messages": "hi"}),
            "invalid_request",
        ),
        "wide-ints": (
            request("wide-ints", "deepseek-v3-0324-syn", metadata=WIDE),
            "synthetic",
        ),
        "too-wide": (  # would be read as a float and written back changed
            b'{"request_id": "too-wide", "model": "deepseek-v3-0324-syn", "messages": '
            b'[{"role": "user", "content": "hi"}], "metadata": {"order": 18446744073709551616}}',
            "invalid_request",
        ),
    }
    async with running(env) as worker:
        live = worker.settings
        await send(
            live,
            [(rid, value) for rid, (value, _) in cases.items()],
            headers=lambda rid: [("request-id", rid.encode()), ("traceparent", TRACE)],
        )
        found = await terminal(live, len(cases))

    assert set(found) == set(cases)
    for rid, (value, expected) in cases.items():
        topic, record, headers = found[rid]
        outcome = record.get("provider") or record.get("reason")
        assert outcome == expected, (rid, record)
        SCHEMAS["result" if "provider" in record else "dead-letter"].validate(record)
        assert headers["request-id"] == rid.encode() and headers["traceparent"] == TRACE
        if "reason" in record and record["request"] is None:
            assert base64.b64decode(record["raw"]) == value  # the original bytes
    assert found["ok-v3"][1]["metadata"] == {"team": "search"}
    assert found["wide-ints"][1]["metadata"] == WIDE  # exactly, as ints
    kimi = found["fb-kimi"][1]
    assert kimi["fallback"] is True and kimi["provider_model"] == "moonshotai/Kimi-K2-Instruct"
    assert kimi["attempts"] >= 2  # the failed Synthetic attempts count too
    both = found["both-fail"][1]
    assert [f["provider"] for f in both["failures"]] == ["synthetic", "together"]
    assert both["request"]["request_id"] == "both-fail"  # kept for a re-drive
    assert found["nofb-glm"][1]["failures"][0]["status"] == 500


async def test_fallback_records_carry_the_failure_and_validate(env: dict[str, str]) -> None:
    async with running(env) as worker:
        live = worker.settings
        await send(live, [("fb-1", request("fb-1", "kimi-k2-thinking-syn"))])
        await terminal(live, 1)
        (hop,) = await read_all(live, live.topic("predictions.fallback"))
    record = orjson.loads(hop.value)
    SCHEMAS["fallback"].validate(record)
    assert record["failure"]["provider"] == "synthetic"
    assert record["failure"]["error_type"] in {"unavailable", "circuit_open"}
    assert record["failure"]["status"] in {503, None}
    assert dict(hop.headers)["request-id"] == b"fb-1"


async def test_no_together_key_dead_letters_as_unconfigured(
    settings: Settings, env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    await topics.apply(settings, await topics.plan(settings))
    async with Simulator(SimConfig(faults=parse_faults(FAULTS))) as sim:
        live = simulated(env, sim, TOGETHER_API_KEY="")
        worker = Worker(live, BOTH)
        async with anyio.create_task_group() as group:
            group.start_soon(worker.run)
            await send(live, [("k-1", request("k-1", "kimi-k2-thinking-syn"))])
            found = await terminal(live, 1)
            worker.stop()
    assert found["k-1"][1]["reason"] == "fallback_unconfigured"
    assert "TOGETHER_API_KEY" in found["k-1"][1]["error"]
    assert _warned(caplog, "TOGETHER_API_KEY is not set")
    assert not _warned(caplog, "SYNTHETIC_API_KEY")


async def test_a_primary_stage_without_a_synthetic_key_says_so_at_start(
    settings: Settings, env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An empty mounted secret: the worker would look healthy and answer nothing."""
    await topics.apply(settings, await topics.plan(settings))
    async with Simulator(SimConfig(api_key="sk-real")) as sim:
        live = simulated(env, sim, SYNTHETIC_API_KEY="")
        async with worker_on(Worker(live, ("primary",))):
            pass
    assert _warned(caplog, "SYNTHETIC_API_KEY is not set")


def _warned(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(r.levelname == "WARNING" and text in r.getMessage() for r in caplog.records)


async def test_a_malformed_record_between_two_good_ones(env: dict[str, str]) -> None:
    bad = b'{"request_id": "bad", "model": "deepseek-r1-0528-syn", "messages": [{"role"'
    async with running(env) as worker:
        live = worker.settings
        topic = live.topic("predictions.requests")
        await produce(
            live,
            topic,
            [
                Record(request("good-1", "deepseek-v3-0324-syn"), b"k", 0),
                Record(bad, b"k", 0, headers=[("request-id", b"bad")]),
                Record(request("good-2", "deepseek-v3-0324-syn"), b"k", 0),
            ],
        )
        found = await terminal(live, 3)
    assert found["good-1"][1]["provider"] == found["good-2"][1]["provider"] == "synthetic"
    letter = found["bad"][1]
    assert letter["reason"] == "invalid_json"
    assert base64.b64decode(letter["raw"]) == bad
    assert letter["source"]["topic"] == topic
    assert (letter["source"]["partition"], letter["source"]["offset"]) == (0, 1)


async def _kcat(*args: str, data: bytes | None = None) -> bytes:
    done = await anyio.run_process(["kcat", *args], input=data, check=True)
    return done.stdout


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed")
async def test_a_non_python_upstream_can_produce_and_read_with_kcat(env: dict[str, str]) -> None:
    async with running(env) as worker:
        live = worker.settings
        brokers = live.kafka.bootstrap_servers
        await _kcat(
            "-b",
            brokers,
            "-P",
            "-t",
            live.topic("predictions.requests"),
            "-k",
            "kcat-1",
            "-H",
            "request-id=kcat-1",
            data=request("kcat-1", "deepseek-r1-0528-syn"),
        )
        await terminal(live, 1)
        out = await _kcat(
            "-b",
            brokers,
            "-C",
            "-t",
            live.topic("predictions.results"),
            "-o",
            "beginning",
            "-e",
            "-c",
            "1",
            "-f",
            "%k\t%s\n",
        )
    key, value = out.decode().strip().split("\t", 1)
    assert key == "kcat-1"
    result = orjson.loads(value)
    assert result["request_id"] == "kcat-1" and result["content"]


async def test_stream_run_all_as_a_process_drains_on_sigterm(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    await topics.apply(settings, await topics.plan(settings))
    log = tmp_path / "worker.log"
    async with (
        Simulator(SimConfig()) as sim,
        worker_process(simulator_env(env, sim), log) as process,
    ):
        await send(
            settings,
            [(f"p-{i}", request(f"p-{i}", "deepseek-v3-0324-syn")) for i in range(20)],
        )
        await terminal(settings, 20)
    output = log.read_text()
    assert process.returncode == 0, output[-2000:]
    assert "Traceback" not in output
    for line in output.splitlines():
        orjson.loads(line)  # every log line is a JSON object


async def test_a_second_signal_stops_at_once_and_exits_1(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    """The first SIGTERM drains (calls of 60 s here); the second stops at once, and the
    exit code tells a supervisor that it did not drain."""
    await topics.apply(settings, await topics.plan(settings))
    log = tmp_path / "worker.log"
    async with Simulator(SimConfig(latency=parse_latency("60"))) as sim:
        with log.open("wb") as stderr:
            process = await anyio.open_process(
                [sys.executable, "-m", "stream", "run", "primary"],
                env=simulator_env(env, sim),
                stderr=stderr,
            )
        try:
            await send(settings, [("slow-1", request("slow-1", "deepseek-v3-0324-syn"))])

            async def calling() -> bool:
                return bool(sim.stats()["requests"] >= 1)

            await eventually(calling, timeout_s=60)
            process.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return "draining" in log.read_text()

            await eventually(draining, timeout_s=30)
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):  # not the 60 s call, nor the drain's 120 s
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    output = log.read_text()
    assert process.returncode == 1, output[-2000:]
    assert "second signal: exiting without draining" in output
    last = output.strip().splitlines()[-1]  # the README's one line for every exit 1
    assert last.startswith("stream: error: stopped by a second signal before the drain"), last
    assert "Traceback" not in output


async def test_stream_run_without_topics_is_one_clear_line(env: dict[str, str]) -> None:
    done = await run_cli(env, "run", "primary")
    assert done.returncode == 1
    assert "stream topics apply" in done.stderr and done.stderr.count("\n") == 1


async def test_a_running_worker_serves_metrics_that_move_and_is_ready(
    settings: Settings, env: dict[str, str]
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    await topics.apply(settings, await topics.plan(settings))
    async with Simulator(SimConfig(faults=parse_faults(FAULTS))) as sim:
        worker = Worker(simulated(env, sim), BOTH)
        async with anyio.create_task_group() as group, httpx.AsyncClient() as http:
            group.start_soon(worker.run)
            await worker.started.wait()
            base = f"http://127.0.0.1:{worker.port}"
            assert (await http.get(f"{base}/healthz")).status_code == 200
            await send(
                worker.settings,
                [
                    ("m-ok", request("m-ok", "deepseek-v3-0324-syn")),
                    ("m-fb", request("m-fb", "kimi-k2-thinking-syn")),
                    ("m-bad", b"{not json"),
                ],
            )
            await terminal(worker.settings, 3)

            async def ready() -> bool:
                return (await http.get(f"{base}/readyz")).status_code == 200

            await eventually(ready)
            text = (await http.get(f"{base}/metrics")).text
            worker.stop()
    samples = [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]

    def total(name: str, **labels: str) -> float:
        return sum(v for n, got, v in samples if n == name and labels.items() <= got.items())

    assert total("stream_records_total", stage="primary", outcome="result") == 1
    assert total("stream_records_total", stage="primary", outcome="fallback") == 1
    assert total("stream_records_total", outcome="dead_letter", reason="invalid_json") == 1
    assert total("stream_records_total", stage="fallback", outcome="result") == 1
    assert total("stream_provider_request_duration_seconds_count", provider="synthetic") >= 2
    assert total("stream_engine_records_done_total") >= 4


async def test_redrive_after_an_outage_turns_fallback_failed_into_results(
    settings: Settings, env: dict[str, str]
) -> None:
    # Each request fails its first four calls, whichever provider gets them: with one retry
    # per provider, that is an outage of both for the first run, and over for the re-drive.
    items = [
        (f"o-{i}", request(f"o-{i}", "deepseek-r1-0528-syn", f"[[sim:503x4]] q{i}"))
        for i in range(5)
    ]
    async with running(env) as worker:
        live = worker.settings
        await send(live, items)
        first = await terminal(live, len(items))
        assert {record["reason"] for _, record, _ in first.values()} == {"fallback_failed"}
        catalog = worker.catalog
        models = [
            (worker.clients["synthetic"], catalog.get("deepseek-r1-0528-syn")),
            (worker.clients["together"], catalog.get("deepseek-r1")),
        ]

        async def outage_over() -> bool:  # the breakers cooled down: calls get through again
            return all(client.breaker_state(m) != "open" for client, m in models if m)

        await eventually(outage_over)

        done = await run_cli(env, "redrive", "--reason", "fallback_failed")
        assert done.returncode == 0, done.stderr
        results: dict[str, Any] = {}

        async def all_answered() -> bool:
            for record in await read_all(live, live.topic("predictions.results")):
                results[orjson.loads(record.value)["request_id"]] = record
            return len(results) == len(items)

        await eventually(all_answered, timeout_s=60)
    assert set(results) == {rid for rid, _ in items}
    for record in results.values():
        assert dict(record.headers)["attempt"] == b"2"  # the re-drive is the second attempt


def test_tuned_gc_still_reclaims_cycles_made_after_start_up() -> None:
    """`stream run` freezes start-up objects and collects less often; garbage cycles made
    while it runs (a failed call's traceback, say) must still be freed."""
    code = """
import gc, weakref
from stream.worker import tune_gc
tune_gc()
class Node: pass
alive = []
for _ in range(50_000):
    a, b = Node(), Node()
    a.other, b.other = b, a
    alive.append(weakref.ref(a)) if len(alive) < 100 else None
gc.collect()
print(gc.get_freeze_count() > 0, sum(ref() is not None for ref in alive))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["True", "0"]


async def test_a_signal_while_start_up_waits_for_kafka_stops_the_worker_at_once(
    env: dict[str, str],
) -> None:
    """A broker that accepts connections and never answers holds start-up's topic check
    for its connection timeout (~30 s); SIGTERM meanwhile must not wait it out."""
    accepted = anyio.Event()

    async def hang(stream: anyio.abc.SocketStream) -> None:
        accepted.set()
        async with stream:
            await anyio.sleep_forever()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        settings = Settings.from_env({**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"})
        worker = Worker(settings, ("primary",))
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listener.serve, hang)
            with anyio.fail_after(10):
                async with anyio.create_task_group() as running:
                    running.start_soon(worker.run)
                    await accepted.wait()
                    worker.stop()
            tasks.cancel_scope.cancel()
    assert not worker.started.is_set() and worker.engines == []
