"""The chaos run: the whole pipeline under crashes, a broker restart, a provider outage
and poison input, then a proof that nothing was lost, doubled or invented.

    python -m tests.chaos [--requests 10000] [--guarantee exactly-once|at-least-once] [--json]
                          [--brokers 3 [--broker-kills 4] [--broker-down 20]]

It starts its own Kafka broker and a provider simulator (`stream simulate`) in subprocesses,
2 primary and 2 fallback workers (`stream run …`) under a unique topic prefix, and feeds
`--requests` records at a steady pace over `--duration` seconds, 5 % of them poison (bad
JSON, bad UTF-8, a record at the topic's 1 MiB limit, wrong types, an unknown model) and
some valid requests that reuse another's request_id. Meanwhile it SIGKILLs and restarts
workers, restarts the broker once, and opens a Synthetic outage (`hf:*` answers 503), so
mapped models fall back to Together and unmapped ones dead-letter. A worker that exits on
its own (exactly-once crashes on purpose when Kafka is gone) is restarted, as a supervisor
would, and counted. Workers are static members (`--instance-id`, their names). The primary
stage starts with one worker and scales out to three mid-run; later every worker is
restarted in turn (SIGTERM, drain, start again). Each event reports the answered calls
paid for again until the next event. With `--brokers 3` it runs on a three-broker cluster
instead and, in place of the broker restart, kills partition leaders and the active
controller on purpose (tests/chaoscluster.py). For every fault it reports the longest time
no terminal record arrived before the next one (`stalls`, `longest_gap_s_by_fault`).

The checker (`Checker`) reads every output topic with read_committed and the input topic
itself (so an input the producer wrote twice counts twice), and proves:
- each valid input record has exactly one terminal record (a result, or a `no_fallback`
  dead letter for an unmapped model), at least one with duplicates counted in
  at-least-once mode. Two input records with the same request_id are two requests: each
  gets its own terminal record (request_id is not a de-duplication key);
- each poison record is a dead letter with the right reason, its source topic, partition
  and offset, and its original bytes (`raw`, base64; or `request` when it parsed);
- nothing else: every output maps to an input.
It prints the figures and exits 1 if an invariant fails.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream import topics
from stream.config import Settings
from stream.devtools.broker import LocalBroker, free_port
from stream.devtools.cluster import CONTROLLERS, LocalCluster, free_ports
from stream.devtools.simulator import simulate_command
from stream.errors import BrokerError
from stream.kafka import admin_client
from stream.stages import Topics
from tests.chaoscluster import BrokerFaults, Progress, broker_schedule
from tests.kit.requests import request

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("deepseek-r1-0528-syn", "kimi-k2-thinking-syn", "deepseek-v3-0324-syn", "glm-4.6-syn")
MAPPED = {"deepseek-r1-0528-syn", "kimi-k2-thinking-syn"}
TOPIC_MAX = 1_048_588  # topics/requests.toml max.message.bytes
POISON_REASONS = {
    "bad_json": "invalid_json",
    "bad_utf8": "invalid_encoding",
    "wrong_types": "invalid_request",
    "unknown_model": "unknown_model",
    "too_large": "too_large",
}


@dataclass(frozen=True, kw_only=True)
class ChaosConfig:
    requests: int = 10_000
    guarantee: str = "exactly-once"
    duration_s: float = 120.0  # how long input keeps arriving
    kills: int = 6
    broker_restart: bool = True
    outage_s: float = 60.0
    poison_rate: float = 0.05
    max_too_large: int = 5  # 1 MiB records: a few prove the point
    seed: int = 1
    max_in_flight: int = 200
    settle_timeout_s: float = 300.0  # after the last input, for every terminal record
    scale_out: bool = True  # the primary stage: 1 worker, then 3 a third of the way in
    rolling_restart: bool = True  # every worker restarted in turn, three quarters in
    brokers: int = 1  # 3: a local cluster, whose leaders are killed instead of a restart
    broker_kills: int = 4
    broker_down_s: float = 20.0


@dataclass(frozen=True)
class Input:
    seq: int
    kind: str  # "valid", "duplicate_id", or a key of POISON_REASONS
    value: bytes
    model: str | None = None


# -- the input plan ---------------------------------------------------------------------


def plan(config: ChaosConfig) -> list[Input]:
    rng = random.Random(config.seed)
    poison = round(config.requests * config.poison_rate)
    kinds = ["valid"] * (config.requests - poison)
    cheap = ["bad_json", "bad_utf8", "wrong_types", "unknown_model", "duplicate_id"]
    large = min(config.max_too_large, poison // 6 + 1) if poison else 0
    kinds += ["too_large"] * large + [cheap[i % len(cheap)] for i in range(poison - large)]
    rng.shuffle(kinds)
    inputs: list[Input] = []
    for seq, kind in enumerate(kinds):
        inputs.append(_make(seq, kind, inputs, rng))
    return inputs


def _request(seq: int, rid: str, model: str, text: str) -> bytes:
    return request(rid, model, text, metadata={"chaos": seq})


def _make(seq: int, kind: str, before: list[Input], rng: random.Random) -> Input:
    model = MODELS[seq % len(MODELS)]
    if kind == "duplicate_id":
        earlier = [i for i in before if i.kind == "valid"]
        rid = f"c-{rng.choice(earlier).seq}" if earlier else f"c-{seq}"
        return Input(seq, kind, _request(seq, rid, model, f"again {seq}"), model)
    if kind == "valid":
        return Input(seq, kind, _request(seq, f"c-{seq}", model, f"question {seq}"), model)
    if kind == "bad_json":
        return Input(seq, kind, b'{"request_id": "c-%d", "model": ' % seq)
    if kind == "bad_utf8":
        return Input(seq, kind, b"\xff\xfe chaos %d \xc3\x28" % seq)
    if kind == "wrong_types":
        return Input(seq, kind, orjson.dumps({"request_id": seq, "model": 5, "messages": "hi"}))
    if kind == "unknown_model":
        return Input(seq, kind, _request(seq, f"c-{seq}", "gpt-17-syn", "who?"))
    value = _request(seq, f"c-{seq}", model, "x" * (TOPIC_MAX - 400))
    return Input(seq, kind, value + b" " * (TOPIC_MAX - 100 - len(value)))


# -- processes --------------------------------------------------------------------------


@dataclass
class Supervisor:
    """The worker processes: restarted when they exit (counted) or when killed (by us)."""

    env: dict[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    kills: int = 0
    crashes: int = 0
    starts: int = 0
    restarting: set[str] = field(default_factory=set)

    def start(self, name: str) -> None:
        stage = _stage(name)
        self.starts += 1
        with open(self.logs / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "stream", "run", stage, "--instance-id", name],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self, name: str) -> str:
        """SIGKILL `name` and start it again. For a worker the scale-out has not started
        yet, another of its stage stands in, or, rather than a stage's only worker, one of
        another stage (the outage must find the primary stage running). Returns the one
        killed."""
        if name not in self.processes:
            same = sorted(n for n in self.processes if _stage(n) == _stage(name))
            other = sorted(n for n in self.processes if _stage(n) != _stage(name))
            name = same[0] if len(same) > 1 or not other else other[0]
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.kills += 1
        self.start(name)
        return name

    def revive(self) -> None:
        """Restart any worker that exited on its own (a crash: Kafka gone, fenced …)."""
        for name, process in list(self.processes.items()):
            if process.poll() is not None and name not in self.restarting:
                self.crashes += 1
                self.start(name)

    async def restart(self, name: str) -> int:
        """SIGTERM, wait for the drain and the exit, start again and wait until it has its
        partitions back (as a rolling update waits for readiness); the exit code."""
        self.restarting.add(name)
        try:
            process = self.processes[name]
            process.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
            log = self.logs / f"{name}.log"
            seen = log.stat().st_size
            self.start(name)
            fresh = self.processes[name]
            with anyio.move_on_after(30):
                # (a state in a file and another process: polled)
                while b"assigned " not in log.read_bytes()[seen:] and fresh.poll() is None:  # noqa: ASYNC110
                    await anyio.sleep(0.2)
            return code
        finally:
            self.restarting.discard(name)

    def stop(self, timeout_s: float = 60.0) -> list[int | None]:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process in self.processes.values():
            try:
                codes.append(process.wait(timeout_s))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        return codes


def _stage(name: str) -> str:
    return name.rstrip("0123456789")


def _simulator(port: int, config: ChaosConfig, outage: tuple[float, float], log: Path) -> Any:
    faults = f"outage={outage[0]:.1f}-{outage[1]:.1f}:hf:*" if config.outage_s > 0 else ""
    with open(log, "ab") as out:
        return subprocess.Popen(
            simulate_command(
                port, "uniform:0.05:0.3", "--seed", str(config.seed), "--faults", faults
            ),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _wait_http(url: str, process: Any, timeout_s: float = 30.0) -> None:
    with anyio.fail_after(timeout_s):
        async with httpx.AsyncClient() as http:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the simulator exited with {process.returncode}")
                try:
                    if (await http.get(url)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)


# -- the checker ------------------------------------------------------------------------


@dataclass
class Checker:
    """Feeds on the input and output topics; says what is missing, doubled or stray."""

    requests_topic: str
    plan: dict[bytes, Input]
    expected_by_seq: collections.Counter[int] = field(default_factory=collections.Counter)
    poison_at: dict[tuple[int, int], Input] = field(default_factory=dict)
    got_by_seq: collections.Counter[int] = field(default_factory=collections.Counter)
    got_at: collections.Counter[tuple[int, int]] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    providers: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    inputs: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    # Where each terminal record and input lies: the duplicates' details in the verdict.
    outputs_by_seq: dict[int, list[dict[str, Any]]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    outputs_at: dict[tuple[int, int], list[dict[str, Any]]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    inputs_by_seq: dict[int, list[str]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    fallback_by_seq: dict[int, list[str]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )

    def add_input(self, record: Any) -> None:
        item = self.plan.get(record.value)
        self.inputs += 1
        self.kinds[item.kind if item else "unplanned"] += 1
        if item is None:
            self.errors.append(f"unplanned input at {record.partition}@{record.offset}")
        elif item.kind in ("valid", "duplicate_id"):
            self.expected_by_seq[item.seq] += 1
            self.inputs_by_seq[item.seq].append(f"{record.partition}@{record.offset}")
        else:
            self.poison_at[(record.partition, record.offset)] = item

    def add_fallback(self, record: Any) -> None:
        """A record of the fallback topic (read_committed): where each request went there."""
        metadata = orjson.loads(record.value).get("metadata")
        seq = metadata.get("chaos") if isinstance(metadata, dict) else None
        if isinstance(seq, int):
            self.fallback_by_seq[seq].append(
                f"{record.partition}@{record.offset} ts={record.timestamp}"
            )

    def add_output(self, topic_kind: str, value: bytes, record: Any = None) -> None:
        body = orjson.loads(value)
        where = _where(topic_kind, body, record)
        if topic_kind == "result":
            self.providers[body["provider"]] += 1
            self._count_seq(body.get("metadata"), "result", where)
            return
        self.reasons[body["reason"]] += 1
        source = body["source"]
        if source["topic"] == self.requests_topic:
            self.got_at[(source["partition"], source["offset"])] += 1
            self.outputs_at[(source["partition"], source["offset"])].append(where)
            self._check_poison(body)
        elif body["reason"] == "no_fallback" and body["request"]["model"] not in MAPPED:
            self._count_seq(body["request"].get("metadata"), "dead letter", where)
        else:
            self.errors.append(f"unexpected dead letter: {body['reason']}: {body['error'][:200]}")

    def _count_seq(self, metadata: Any, what: str, where: dict[str, Any] | None = None) -> None:
        seq = metadata.get("chaos") if isinstance(metadata, dict) else None
        if not isinstance(seq, int):
            self.errors.append(f"stray {what} without a chaos seq: {metadata!r}")
            return
        self.got_by_seq[seq] += 1
        if where is not None:
            self.outputs_by_seq[seq].append(where)

    def duplicate_details(self, most: int = 40) -> list[dict[str, Any]]:
        """Each doubled request: its input(s), its fallback record(s), its terminal records."""
        found: list[dict[str, Any]] = []
        for seq, n in sorted(self.expected_by_seq.items()):
            if self.got_by_seq[seq] > n:
                found.append(
                    {
                        "seq": seq,
                        "inputs": self.inputs_by_seq[seq],
                        "fallback": self.fallback_by_seq.get(seq, []),
                        "outputs": self.outputs_by_seq[seq],
                    }
                )
        for at in sorted(self.poison_at):
            if self.got_at[at] > 1:
                found.append({"poison_at": at, "outputs": self.outputs_at[at]})
        return found[:most]

    def _check_poison(self, letter: dict[str, Any]) -> None:
        source = letter["source"]
        item = self.poison_at.get((source["partition"], source["offset"]))
        where = f"{source['partition']}@{source['offset']}"
        if item is None:
            self.errors.append(f"dead letter for a valid request at {where}: {letter['reason']}")
            return
        if letter["reason"] != POISON_REASONS[item.kind]:
            self.errors.append(f"{item.kind} at {where} dead-lettered as {letter['reason']}")
        carried = (
            base64.b64decode(letter["raw"]) == item.value
            if letter["raw"] is not None
            else letter["request"] == orjson.loads(item.value)
        )
        if not carried:
            self.errors.append(f"{item.kind} at {where}: the dead letter lost the original")

    def complete(self) -> bool:
        return all(self.got_by_seq[s] >= n for s, n in self.expected_by_seq.items()) and all(
            self.got_at[at] >= 1 for at in self.poison_at
        )

    def verdict(self, exactly_once: bool) -> dict[str, Any]:
        missing = sum(max(0, n - self.got_by_seq[s]) for s, n in self.expected_by_seq.items())
        missing += sum(1 for at in self.poison_at if self.got_at[at] == 0)
        duplicates = sum(max(0, self.got_by_seq[s] - n) for s, n in self.expected_by_seq.items())
        duplicates += sum(max(0, self.got_at[at] - 1) for at in self.poison_at)
        stray = sum(n for s, n in self.got_by_seq.items() if s not in self.expected_by_seq)
        stray += sum(n for at, n in self.got_at.items() if at not in self.poison_at)
        errors = list(self.errors)
        if missing:
            errors.append(f"{missing} input records have no terminal record")
        if stray:
            errors.append(f"{stray} terminal records match no input record")
        if exactly_once and duplicates:
            errors.append(f"{duplicates} duplicate terminal records under exactly-once")
        return {
            "inputs": self.inputs,
            "valid_inputs": sum(self.expected_by_seq.values()),
            "poison_inputs": len(self.poison_at),  # duplicate ids are valid inputs
            "inputs_by_kind": dict(self.kinds),
            "terminal_records": sum(self.got_by_seq.values()) + sum(self.got_at.values()),
            "missing": missing,
            "duplicates": duplicates,
            "stray": stray,
            "results_by_provider": dict(self.providers),
            "dead_letters_by_reason": dict(self.reasons),
            "errors": errors[:20],
            "ok": not errors,
            "duplicate_details": self.duplicate_details() if duplicates else [],
        }


def _skipped_markers(home: Path) -> int:
    """How many times the brokers skipped a transaction's markers, per their logs."""
    return sum(
        line.count("hence can be skipped")
        for log in home.rglob("broker.log")
        for line in log.read_text(errors="replace").splitlines()
    )


def _where(topic_kind: str, body: dict[str, Any], record: Any) -> dict[str, Any]:
    """Where a terminal record lies and what tells its writer apart (for the details)."""
    found: dict[str, Any] = {
        "kind": topic_kind,
        "provider": body.get("provider"),
        "reason": body.get("reason"),
        "stage": body.get("stage"),
        "at": body.get("completed_at") or body.get("dead_at"),
        "source": body.get("source"),
    }
    if record is not None:
        found.update(
            partition=record.partition,
            offset=record.offset,
            timestamp=record.timestamp,
            headers={k: (v or b"").decode(errors="replace") for k, v in record.headers or ()},
        )
    return found


# -- the run ----------------------------------------------------------------------------


class Run:
    def __init__(self, config: ChaosConfig, home: Path) -> None:
        self.config = config
        self.home = home
        self.broker = _kafka(config, home / "kafka")
        self.inputs = plan(config)
        self.broker_restarts = 0
        self.events: list[str] = []
        self.timeline: list[tuple[float, str]] = []  # (monotonic, event): what costs money
        self.started = time.monotonic()
        self.progress = Progress()
        self.faults: BrokerFaults | None = None

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {text}"
        self.events.append(line)
        print(line, file=sys.stderr, flush=True)

    def event(self, text: str) -> None:
        """Log a disruption; the calls paid twice after it are reported against it."""
        self.timeline.append((time.monotonic(), text))
        self.log(text)

    def settings(self, prefix: str) -> Settings:
        return Settings.from_env(
            {
                "KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
                "STREAM_TOPIC_PREFIX": prefix,
            }
        )


async def run(config: ChaosConfig, home: Path) -> dict[str, Any]:
    chaos = Run(config, home)
    await _start_broker(chaos)
    try:
        return await _run(chaos)
    finally:
        await anyio.to_thread.run_sync(chaos.broker.stop)


def _kafka(config: ChaosConfig, home: Path) -> LocalBroker | LocalCluster:
    if config.brokers == 1:
        return LocalBroker(home=home, port=free_port())
    port = free_ports(config.brokers + CONTROLLERS)
    return LocalCluster(home=home, port=port, brokers=config.brokers)


async def _start_broker(chaos: Run, tries: int = 3) -> None:
    """Start the broker; on a free port taken in between (a race), try other ports."""
    for attempt in range(tries):
        try:
            await anyio.to_thread.run_sync(chaos.broker.start)
            return
        except BrokerError as exc:
            chaos.log(f"broker did not start ({exc}); other ports")
            if attempt == tries - 1:
                raise
            chaos.broker = _kafka(chaos.config, chaos.home / f"kafka{attempt + 1}")


async def _start_simulator(chaos: Run, outage: tuple[float, float]) -> tuple[Any, int]:
    """The simulator subprocess and its port, retried on a port taken in between."""
    for _attempt in range(3):
        port = free_port()
        sim = _simulator(port, chaos.config, outage, chaos.home / "simulator.log")
        try:
            await _wait_http(f"http://127.0.0.1:{port}/sim/stats", sim)
            return sim, port
        except RuntimeError as exc:
            chaos.log(str(exc))
    raise RuntimeError(f"the simulator did not start; see {chaos.home / 'simulator.log'}")


async def _run(chaos: Run) -> dict[str, Any]:
    config = chaos.config
    prefix = f"chaos{uuid.uuid4().hex[:8]}."
    settings = chaos.settings(prefix)
    await topics.apply(settings, await topics.plan(settings))
    if isinstance(chaos.broker, LocalCluster):
        chaos.faults = BrokerFaults(chaos.broker, settings, config.broker_down_s)
    # The outage opens a fifth of the way in, so it overlaps kills and live traffic.
    outage_start = config.duration_s * 0.2
    sim, sim_port = await _start_simulator(chaos, (outage_start, outage_start + config.outage_s))
    supervisor = Supervisor(_worker_env(chaos, prefix, sim_port), chaos.home)
    try:
        chaos.log(f"simulator up; outage from {outage_start:.0f}s for {config.outage_s:.0f}s")
        for name in _first_workers(config):
            supervisor.start(name)
        checker, wall, stalls, costs = await _drive(chaos, settings, supervisor, sim_port)
        async with httpx.AsyncClient() as http:
            stats = (await http.get(f"http://127.0.0.1:{sim_port}/sim/stats")).json()
    finally:
        codes = await anyio.to_thread.run_sync(supervisor.stop)
        sim.send_signal(signal.SIGTERM)
        sim.wait(10)
    chaos.log(f"workers stopped (exit codes {codes}); reading every output topic")
    # The verdict reads everything afresh, after the workers stopped: late duplicates count.
    final = Checker(checker.requests_topic, checker.plan)
    await _read_inputs(settings, final)
    for record in await _read_topic(settings, settings.topic("predictions.fallback")):
        final.add_fallback(record)
    await _read_outputs(settings, final, until_complete=False)
    figures = final.verdict(config.guarantee == "exactly-once")
    needed = figures["valid_inputs"]
    return {
        "guarantee": config.guarantee,
        "requests": len(chaos.inputs),
        **figures,
        "kills": supervisor.kills,
        "worker_restarts_after_exit": supervisor.crashes,
        "broker_restarts": chaos.broker_restarts,
        # Kafka 4.4.0 takes a partition without a leader (a single node stopping or coming
        # back) for a deleted one and skips its transaction markers: a transaction committed
        # then is settled apart, its outputs and its offsets (tests/txn_markers.py).
        "kafka_skipped_txn_markers": _skipped_markers(chaos.home),
        "brokers": config.brokers,
        "broker_kills": chaos.faults.broker_kills if chaos.faults else 0,
        "controller_kills": chaos.faults.controller_kills if chaos.faults else 0,
        **stalls,
        "outage_s": config.outage_s,
        "provider_calls": stats["requests"],
        "provider_calls_needed": needed,
        # Calls beyond one per request that needed one (the breaker skips calls while
        # Synthetic is down, which can hide the rest: see the next figure).
        "provider_calls_wasted": max(0, stats["requests"] - needed),
        # Calls the simulator decided to answer that left no result: cut short by a kill or
        # a crash (asked again later), or answered and thrown away (see the next figures).
        "provider_ok_calls_paid_twice": max(
            0, stats["by_outcome"].get("ok", 0) - sum(figures["results_by_provider"].values())
        ),
        "provider_calls_by_outcome": stats["by_outcome"],
        # Calls for a question asked before (re-runs, retries), and those asked again after
        # an answer: money paid twice for certain (the simulator's counts).
        "provider_calls_asked_again": stats["repeated"],
        "provider_answered_calls_paid_twice": stats["paid_twice"],
        "calls_again_by_event": _per_event(chaos, costs, stats),
        "provider_peak_in_flight": stats["peak_in_flight"],
        "wall_time_s": round(wall, 1),
        "worker_exit_codes": codes,
    }


def _schedule(config: ChaosConfig, rng: random.Random) -> list[tuple[float, str]]:
    """(seconds after the first input, action): kills spread over the run, one restart (on
    a cluster: leaders killed and brought back), and the outage's edges, for the record."""
    span = config.duration_s
    steps = max(1, config.kills - 1)
    actions = [
        (span * (0.1 + 0.8 * k / steps), f"kill {rng.choice(WORKERS)}") for k in range(config.kills)
    ]
    if config.brokers > 1:
        actions += broker_schedule(span, config.broker_kills)
    elif config.broker_restart:
        actions.append((span * 0.55, "restart broker"))
    if config.outage_s > 0:
        actions += [(span * 0.2, "outage starts"), (span * 0.2 + config.outage_s, "outage ends")]
    return sorted(actions)


WORKERS = ("primary1", "primary2", "fallback1", "fallback2")


async def _drive(
    chaos: Run, settings: Settings, supervisor: Supervisor, sim_port: int
) -> tuple[Checker, float, dict[str, Any], list[tuple[float, int, int]]]:
    config = chaos.config
    checker = Checker(Topics.of(settings).requests, {i.value: i for i in chaos.inputs})
    rng = random.Random(config.seed)
    begun = time.monotonic()
    costs: list[tuple[float, int, int]] = []
    chaos.progress = Progress(started=begun)
    async with anyio.create_task_group() as group:
        group.start_soon(_supervise, supervisor)
        group.start_soon(_watch_progress, settings, chaos.progress)
        group.start_soon(_act, chaos, supervisor, _schedule(config, rng), begun)
        group.start_soon(_membership_events, chaos, supervisor, begun)
        group.start_soon(_sample_costs, sim_port, costs)
        await _produce(chaos, settings, begun)
        chaos.log(f"all {len(chaos.inputs)} inputs written; waiting for terminal records")
        await _read_inputs(settings, checker)
        with anyio.move_on_after(config.settle_timeout_s):
            await _read_outputs(settings, checker, until_complete=True)
        end = time.monotonic()
        chaos.log("complete" if checker.complete() else "NOT complete: settle timeout")
        group.cancel_scope.cancel()
    stalls = {
        "longest_gap_s_by_fault": chaos.progress.longest_by_kind(end),
        "stalls": chaos.progress.report(end),
    }
    return checker, end - begun, stalls, costs


async def _watch_progress(settings: Settings, progress: Progress) -> None:
    """Note when each terminal record arrives (read_committed), from the first."""
    names = Topics.of(settings)
    consumer = await _assigned(settings, [names.results, names.dead_letter])
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            progress.arrived(sum(len(records) for records in batch.values()))
    finally:
        with anyio.CancelScope(shield=True):
            await consumer.stop()


async def _supervise(supervisor: Supervisor) -> None:
    while True:
        await anyio.sleep(1.0)
        supervisor.revive()


async def _act(
    chaos: Run, supervisor: Supervisor, schedule: list[tuple[float, str]], begun: float
) -> None:
    async with anyio.create_task_group() as group:  # a broker restart does not hold up the rest
        for at, action in schedule:
            await anyio.sleep(max(0.0, begun + at - time.monotonic()))
            group.start_soon(_one_act, chaos, supervisor, action)


async def _one_act(chaos: Run, supervisor: Supervisor, action: str) -> None:
    if action.startswith("outage"):
        chaos.progress.event("outage", action)
    elif action == "restart broker":
        chaos.event(action)
        chaos.progress.event("broker restart", action)
        await anyio.to_thread.run_sync(chaos.broker.stop)
        await anyio.to_thread.run_sync(chaos.broker.start)
        chaos.broker_restarts += 1
        chaos.log("broker back")
    elif chaos.faults is not None and action.startswith("kill leader"):

        def note(kind: str, done: str) -> None:
            chaos.event(done)
            chaos.progress.event(kind, done)

        await chaos.faults.act(action, note)
    else:
        chaos.event(action)
        chaos.progress.event("worker kill", action)
        if (killed := supervisor.kill(action.removeprefix("kill "))) not in action:
            chaos.log(f"killed {killed} instead: {action[5:]} is not running yet")


# -- membership events: scale-out, rolling restarts, and what each event cost ------------


def _first_workers(config: ChaosConfig) -> tuple[str, ...]:
    primaries = ("primary1",) if config.scale_out else ("primary1", "primary2")
    return (*primaries, "fallback1", "fallback2")


async def _membership_events(chaos: Run, supervisor: Supervisor, begun: float) -> None:
    """Scale the primary stage out from 1 to 3 workers about a third of the way in; about
    three quarters in, restart every worker in turn, each once the one before is back. Both
    fall half-way between the kills and the broker restart, so that what each event cost
    is not what a kill just before it cost."""
    config = chaos.config
    scaled = 0.0
    if config.scale_out:
        scaled = _quiet(config, 0.3)
        await anyio.sleep(max(0.0, begun + scaled - time.monotonic()))
        chaos.event("scale out: primary 1 → 3 workers")
        for name in ("primary2", "primary3"):
            supervisor.start(name)
    if config.rolling_restart:
        restart = _quiet(config, 0.75, after=scaled + 5.0)
        await anyio.sleep(max(0.0, begun + restart - time.monotonic()))
        chaos.event("rolling restart of every worker")
        for name in sorted(supervisor.processes):
            await _broker_answers(chaos)  # as an operator would, not while Kafka is away
            code = await supervisor.restart(name)
            chaos.log(f"{name} drained (exit {code}) and started again")


def _aftermath_s(config: ChaosConfig, action: str) -> float:
    """How long a scheduled action disturbs the run, seconds: a worker kill until its worker
    is back and has run again what it lost; a broker restart until the broker is back; a
    leader kill while its broker is down and a little after. The outage's edges cost no
    calls twice (the breaker skips calls while it is open)."""
    if action.startswith("outage"):
        return 0.0
    if action.startswith("kill leader"):
        return config.broker_down_s + 10.0
    return 15.0 if action == "restart broker" else 5.0


async def _broker_answers(chaos: Run) -> None:
    """Until every broker accepts connections (one may be restarting or killed)."""
    for server in chaos.broker.bootstrap_servers.split(","):
        host, _, port = server.rpartition(":")
        while True:
            try:
                stream = await anyio.connect_tcp(host, int(port))
            except OSError:
                await anyio.sleep(0.5)
                continue
            await stream.aclose()
            break


def _quiet(config: ChaosConfig, near: float, after: float = 0.0) -> float:
    """When to start an event, in seconds after the first input: after `after`, at the start
    of a stretch of at least 10 s that no scheduled action disturbs, the one nearest `near`
    (a fraction of the run), so that what the event costs is its own. A run too short for
    such stretches (the CI-sized one) gets `near` itself, overlaps and all."""
    actions = _schedule(config, random.Random(config.seed))  # the same as `_act` follows
    busy = sorted((at, at + _aftermath_s(config, what)) for at, what in actions)
    gaps, free = [], after
    for begin, end in [*busy, (config.duration_s, config.duration_s)]:
        if begin - free >= 10.0:
            gaps.append((free, begin))
        free = max(free, end)
    target = near * config.duration_s
    if not gaps:
        return max(after, target)
    return min(gaps, key=lambda g: abs((g[0] + g[1]) / 2 - target))[0]


async def _sample_costs(sim_port: int, costs: list[tuple[float, int, int]]) -> None:
    """The simulator's counts of calls asked again and of answered ones among them."""
    async with httpx.AsyncClient() as http:
        while True:
            try:
                stats = (await http.get(f"http://127.0.0.1:{sim_port}/sim/stats")).json()
                costs.append((time.monotonic(), stats["repeated"], stats["paid_twice"]))
            except httpx.HTTPError:
                pass
            await anyio.sleep(1.0)


def _per_event(
    chaos: Run, costs: list[tuple[float, int, int]], final: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per event, until the next one (the last: until the end): calls asked again (re-runs
    of calls cut short, retries after errors) and, of those, calls whose question had been
    answered already (paid twice). A window only: a cost may land after the next event."""

    def counts(moment: float) -> tuple[int, int]:
        seen = [(again, paid) for at, again, paid in costs if at <= moment]
        return seen[-1] if seen else (0, 0)

    report = []
    marks = [*chaos.timeline, (float("inf"), "")]
    for (at, event), (until, _) in zip(marks, marks[1:], strict=False):
        end = (final["repeated"], final["paid_twice"]) if until == float("inf") else counts(until)
        start = counts(at)
        report.append(
            {
                "at_s": round(at - chaos.started, 1),
                "event": event,
                "asked_again": end[0] - start[0],
                "paid_twice": end[1] - start[1],
            }
        )
    return report


async def _produce(chaos: Run, settings: Settings, begun: float) -> None:
    """Write the inputs at a steady pace; a send that fails (broker down) is sent again."""
    config = chaos.config
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), acks="all", max_request_size=2 * TOPIC_MAX
    )
    await producer.start()
    try:
        pending: list[tuple[Input, Any]] = []
        gap = config.duration_s / max(1, len(chaos.inputs))
        for n, item in enumerate(chaos.inputs):
            await anyio.sleep(max(0.0, begun + n * gap - time.monotonic()))
            pending.append((item, await _send(producer, settings, item)))
        for item, future in pending:
            while True:
                try:
                    await future
                    break
                except Exception as exc:  # the broker was restarting: write it again
                    chaos.log(f"input {item.seq} not acknowledged ({type(exc).__name__}); again")
                    future = await _send(producer, settings, item)
    finally:
        await producer.stop()


async def _send(producer: AIOKafkaProducer, settings: Settings, item: Input) -> Any:
    key = None
    if item.kind in ("valid", "duplicate_id"):
        key = orjson.loads(item.value)["request_id"].encode()
    while True:
        try:
            return await producer.send(settings.topic("predictions.requests"), item.value, key=key)
        except Exception:  # no metadata while the broker restarts
            await anyio.sleep(0.5)


async def _read_inputs(settings: Settings, checker: Checker) -> None:
    for record in await _read_topic(settings, settings.topic("predictions.requests")):
        checker.add_input(record)


async def _read_outputs(settings: Settings, checker: Checker, *, until_complete: bool) -> None:
    """Every result and dead letter (read_committed); with `until_complete`, keep reading
    until the checker has a terminal record for every input."""
    names = Topics.of(settings)
    kinds = {names.results: "result", names.dead_letter: "dead-letter"}
    consumer = await _assigned(settings, list(kinds))
    try:
        tps = list(consumer.assignment())
        ends = await consumer.end_offsets(tps)
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    checker.add_output(kinds[tp.topic], record.value, record)
            if until_complete:
                if checker.complete():
                    return
            elif all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                return
    finally:
        await consumer.stop()


async def _read_topic(settings: Settings, topic: str) -> list[Any]:
    consumer = await _assigned(settings, [topic])
    try:
        tps = list(consumer.assignment())
        ends = await consumer.end_offsets(tps)
        found: list[Any] = []
        while not all([await consumer.position(tp) >= ends[tp] for tp in tps]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(records)
        return found
    finally:
        await consumer.stop()


async def _assigned(settings: Settings, names: list[str]) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(),
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_bytes=16 * 1024 * 1024,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    async with admin_client(settings.kafka, doing="chaos") as admin:
        described = await admin.describe_topics(names)
    tps = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
    await consumer.start()
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return consumer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument(
        "--guarantee", choices=["exactly-once", "at-least-once"], default="exactly-once"
    )
    parser.add_argument(
        "--duration", type=float, default=120.0, help="seconds input keeps arriving"
    )
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--outage", type=float, default=60.0, help="Synthetic outage, seconds")
    parser.add_argument("--no-broker-restart", action="store_true")
    parser.add_argument("--no-scale-out", action="store_true", help="2 primary workers throughout")
    parser.add_argument("--no-rolling-restart", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="figures as one JSON object")
    parser.add_argument(
        "--brokers",
        type=int,
        default=1,
        choices=(1, 3),
        help="3: a local cluster whose leaders die",
    )
    parser.add_argument("--broker-kills", type=int, default=4, help="with --brokers 3")
    parser.add_argument(
        "--broker-down", type=float, default=20.0, help="seconds a killed broker stays down"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs)")
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=300.0,
        help="seconds to wait after the last input for every terminal record",
    )
    args = parser.parse_args(argv)
    # aiokafka logs every reconnect while the broker restarts; the run says what matters.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    config = ChaosConfig(
        requests=args.requests,
        guarantee=args.guarantee,
        duration_s=args.duration,
        kills=args.kills,
        outage_s=args.outage,
        broker_restart=not args.no_broker_restart,
        seed=args.seed,
        scale_out=not args.no_scale_out,
        rolling_restart=not args.no_rolling_restart,
        brokers=args.brokers,
        broker_kills=args.broker_kills,
        broker_down_s=args.broker_down,
        settle_timeout_s=args.settle_timeout,
    )
    home = Path(tempfile.mkdtemp(prefix="chaos-"))
    try:
        figures = anyio.run(run, config, home)
    finally:
        if args.keep:
            print(f"run folder: {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)
    figures["config"] = asdict(config)
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:28} {value}")
    return 0 if figures["ok"] else 1


def _worker_env(chaos: Run, prefix: str, sim_port: int) -> dict[str, str]:
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STREAM_", "SYNTHETIC_", "TOGETHER_", "KAFKA_"))
    }
    sim = f"http://127.0.0.1:{sim_port}/v1"
    return {
        **keep,
        "KAFKA_BOOTSTRAP_SERVERS": chaos.broker.bootstrap_servers,
        "STREAM_TOPIC_PREFIX": prefix,
        "STREAM_GUARANTEE": chaos.config.guarantee,
        "STREAM_METRICS_PORT": "0",
        "STREAM_MAX_IN_FLIGHT": str(chaos.config.max_in_flight),
        "SYNTHETIC_BASE_URL": sim,
        "SYNTHETIC_API_KEY": "chaos",
        "TOGETHER_BASE_URL": sim,
        "TOGETHER_API_KEY": "chaos",
        "STREAM_SYNTHETIC_MAX_RETRIES": "1",
        # A SIGKILLed member must leave the group in seconds, not the default 45.
        "STREAM_SESSION_TIMEOUT_MS": "6000",
        "STREAM_REBALANCE_TIMEOUT_MS": "20000",
        "STREAM_SHUTDOWN_GRACE_S": "20",
    }


if __name__ == "__main__":
    sys.exit(main())
