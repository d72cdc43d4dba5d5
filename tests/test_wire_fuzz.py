"""Hostile records on the wire: hypothesis makes Kafka records (keys, headers with null
values, non-UTF-8 keys and oversized values, values of every kind), produces them through
the real broker (kcat for what no Python client writes) into a running `stream run all`
under each guarantee, and checks after every batch that

- the worker is alive (its process runs and /healthz answers), and
- every input so far has exactly one terminal record (a result or a dead letter), none
  is a `handler_error` or `output_rejected` (hostile input is not a bug), and nothing else
  was written to the terminal topics.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from stream import topics
from stream.config import Settings
from stream.devtools.broker import free_port
from stream.devtools.simulator import simulate_command
from stream.stages import Topics
from tests.kit import ROOT, eventually
from tests.kit.kafka import end_offsets, read_all
from tests.kit.kcat import kcat_produce, needs_kcat

pytestmark = [pytest.mark.kafka, needs_kcat]

PARTITIONS = 6  # of predictions.requests, as declared
# Kimi-K2-Thinking is down on Synthetic: its requests take the fallback topic to Together.
FAULTS = "hf:moonshotai/Kimi-K2-Thinking=rate:1:503"
MODELS = ["deepseek-v3-0324-syn", "kimi-k2-thinking-syn", "glm-4.6-syn", "no-such-model"]
# Oversized parts travel as markers (a failing example stays readable) and are made
# full size when produced: over what the worker carries or takes, under the topic's limit.
BIG_HEADER, BIG_KEY = b"<600 kB>", b"<300 kB>"
SIZES = {BIG_HEADER: 600_000, BIG_KEY: 300_000}  # a 300 kB key: over 256 KiB with the value


@dataclass(frozen=True)
class Input:
    """One record as produced: where it landed, and the request id it carries, if any."""

    partition: int
    offset: int
    request_id: str | None


@dataclass
class Wire:
    """The running worker, and everything produced into it so far."""

    settings: Settings
    process: subprocess.Popen[bytes]
    metrics_port: int
    log: Path
    isolation: str
    inputs: list[Input] = field(default_factory=list)

    def alive(self) -> bool:
        if self.process.poll() is not None:
            return False
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return bool(answer.status == 200)


# -- the records --------------------------------------------------------------------------

not_utf8_names = st.binary(max_size=5).map(
    lambda b: b"\xfe" + b.replace(b"\x00", b"").replace(b"=", b"")
)
# kcat takes these through argv or an input line: no NUL, tab or newline
argv_bytes = st.binary(max_size=24).map(
    lambda b: b.replace(b"\x00", b"").replace(b"\t", b"").replace(b"\n", b"")
)
header_names = st.sampled_from(["request-id", "attempt", "traceparent"]) | st.text(
    "abcxyz-é", min_size=1, max_size=6
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    """A record: partition, key, value (None, bytes, or a request to fill in with a unique
    id), headers; `big` is the one part, if any, that is oversized."""
    kind = draw(st.sampled_from(["request", "request", "request", "bytes", "json", "null"]))
    key = draw(st.none() | argv_bytes)
    # the non-Python route: kcat, for header keys that are not UTF-8 (and a record with
    # neither key nor value, which aiokafka refuses to send)
    raw = draw(st.booleans()) or (kind == "null" and key is None)
    big = None if raw else draw(st.sampled_from([None, None, None, "key", "header"]))
    headers: list[tuple[Any, bytes | None]] = []
    for _ in range(draw(st.integers(0, 3))):
        name: Any = draw(header_names)
        headers.append((name.encode() if raw else name, draw(st.none() | argv_bytes)))
    if raw and draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), (draw(not_utf8_names), b"v"))
    if big == "header":
        headers.append((draw(header_names), BIG_HEADER))
    if big == "key":
        key = BIG_KEY  # the key counts towards STREAM_MAX_REQUEST_BYTES
    value: Any = {
        "request": lambda: {
            "model": draw(st.sampled_from(MODELS)),
            "messages": [{"role": "user", "content": draw(st.text(max_size=20))}],
            **draw(st.sampled_from([{}, {}, {"deadline": "2001-01-01T00:00:00Z"}])),
        },
        "bytes": lambda: draw(st.binary(max_size=40)),
        "json": lambda: orjson.dumps(draw(json_values)),
        "null": lambda: None,
    }[kind]()
    partition = draw(st.integers(0, PARTITIONS - 1))
    return {"partition": partition, "key": key, "value": value, "headers": headers, "raw": raw}


# -- the worker ---------------------------------------------------------------------------


@pytest.fixture(params=["at-least-once", "exactly-once"])
def wire(request: pytest.FixtureRequest, env: dict[str, str], tmp_path: Path) -> Iterator[Wire]:
    guarantee: str = request.param
    sim_port, metrics_port = free_port(), free_port()
    simulator = subprocess.Popen(
        simulate_command(sim_port, "0.01", "--faults", FAULTS),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sim = f"http://127.0.0.1:{sim_port}/v1"
    worker_env = {
        **env,
        "SYNTHETIC_BASE_URL": sim,
        "SYNTHETIC_API_KEY": "sim",
        "TOGETHER_BASE_URL": sim,
        "TOGETHER_API_KEY": "sim",
        "STREAM_SYNTHETIC_MAX_RETRIES": "0",
        "STREAM_GUARANTEE": guarantee,
        "STREAM_COMMIT_INTERVAL_S": "0.2",
        "STREAM_METRICS_PORT": str(metrics_port),
    }
    config = Settings.from_env(worker_env)
    anyio.run(_apply, config)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "stream", "run", "all"], env=worker_env, cwd=ROOT, stderr=out
        )
    isolation = "read_committed" if guarantee == "exactly-once" else "read_uncommitted"
    wire = Wire(config, process, metrics_port, log, isolation)
    try:
        anyio.run(_ready, wire)
        yield wire
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        simulator.terminate()
        simulator.wait()


async def _apply(config: Settings) -> None:
    await topics.apply(config, await topics.plan(config))


async def _ready(wire: Wire) -> None:
    def ready() -> bool:
        try:
            url = f"http://127.0.0.1:{wire.metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=5) as answer:
                return bool(answer.status == 200)
        except OSError:
            assert wire.process.poll() is None, wire.log.read_text()[-3000:]
            return False

    async def check() -> bool:
        return await anyio.to_thread.run_sync(ready)

    await eventually(check, timeout_s=90)


# -- produce, then check ------------------------------------------------------------------


async def _produce(wire: Wire, batch: list[dict[str, Any]]) -> None:
    config = wire.settings
    topic = config.topic("predictions.requests")
    tag = uuid.uuid4().hex[:8]
    producer = AIOKafkaProducer(
        bootstrap_servers=config.kafka.bootstrap_servers, max_request_size=2 * 1024 * 1024
    )
    await producer.start()
    try:
        for i, record in enumerate(batch):
            request_id = None
            value = record["value"]
            if isinstance(value, dict):
                request_id = f"fz-{tag}-{i}"
                value = orjson.dumps({"request_id": request_id, **value})
            if record["raw"]:
                before = (await end_offsets(config, topic))[record["partition"]]
                await kcat_produce(
                    config.kafka.bootstrap_servers,
                    topic,
                    record["partition"],
                    [value],
                    key=record["key"],
                    headers=record["headers"],
                )
                offset = (await end_offsets(config, topic))[record["partition"]] - 1
                assert offset == before, "kcat wrote no record"  # nobody else writes here
            else:
                sent = await producer.send_and_wait(
                    topic,
                    value,
                    key=_full(record["key"]),
                    partition=record["partition"],
                    headers=[(name, _full(v)) for name, v in record["headers"]],
                )
                offset = sent.offset
            wire.inputs.append(Input(record["partition"], offset, request_id))
    finally:
        await producer.stop()


def _full(part: bytes | None) -> bytes | None:
    return b"x" * SIZES[part] if part in SIZES else part


async def _terminal(wire: Wire) -> dict[Input, list[dict[str, Any]]]:
    """Every terminal record written so far, by the input it answers (checked: nothing
    answers no input)."""
    names = Topics.of(wire.settings)
    by_position = {(i.partition, i.offset): i for i in wire.inputs}
    by_id = {i.request_id: i for i in wire.inputs if i.request_id}
    found: dict[Input, list[dict[str, Any]]] = {}
    for topic in (names.results, names.dead_letter):
        for record in await read_all(wire.settings, topic, isolation=wire.isolation):
            value = orjson.loads(record.value)
            source = value.get("source") or {}
            if source.get("topic") == names.requests:
                answered = by_position.get((source["partition"], source["offset"]))
            else:  # a result, or a dead letter of the fallback stage
                answered = by_id.get(value["request_id"])
            assert answered is not None, f"a terminal record for no input: {value}"
            found.setdefault(answered, []).append(value)
    return found


async def _check(wire: Wire) -> None:
    found: dict[Input, list[dict[str, Any]]] = {}

    async def all_answered() -> bool:
        assert await anyio.to_thread.run_sync(wire.alive), wire.log.read_text()[-3000:]
        found.update(await _terminal(wire))
        return len(found) == len(wire.inputs)

    try:
        await eventually(all_answered, timeout_s=60)
    except TimeoutError:
        missing = [i for i in wire.inputs if i not in found]
        raise AssertionError(f"no terminal record for {missing}") from None
    for answered, terminal in found.items():
        assert len(terminal) == 1, f"{answered}: {json.dumps(terminal)[:2000]}"
        assert terminal[0].get("reason") not in ("handler_error", "output_rejected"), terminal[0]
    assert await anyio.to_thread.run_sync(wire.alive)


@settings(
    max_examples=6,
    deadline=None,
    # Examples share one running worker and its topics: a shrunk example runs on top of
    # everything before it, so shrinking would not isolate anything; the failing batch is
    # reported as generated.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(records(), min_size=4, max_size=10))
def test_hostile_records_each_end_as_one_terminal_record(
    wire: Wire, batch: list[dict[str, Any]]
) -> None:
    async def round_() -> None:
        await _produce(wire, batch)
        await _check(wire)

    anyio.run(round_)
