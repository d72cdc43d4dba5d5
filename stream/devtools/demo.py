"""`stream demo`: the whole pipeline on this machine, end to end, in about a minute.

It starts a local Kafka broker when none is reachable, applies the topics, starts the
provider simulator (unless real API keys are set), runs both stages in this process,
publishes a realistic mix of requests, shows progress while they complete, and prints a
summary: per outcome, per provider, with end-to-end latency.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream import logs
from stream import topics as topics_module
from stream.config import Secret, Settings, seconds_option
from stream.devtools.broker import LocalBroker
from stream.devtools.faults import parse_faults, parse_latency
from stream.devtools.jars import cache_dir
from stream.devtools.mix import SCENARIOS, Tally, outcome_of, summary
from stream.devtools.simulator import SimConfig, Simulator
from stream.errors import KafkaError, UsageError
from stream.kafka import admin_client, topic_partitions
from stream.prices import Bill
from stream.stages import Topics
from stream.worker import Worker

__all__ = ["register", "run_demo"]


async def _end_offsets(settings: Settings, names: list[str]) -> dict[TopicPartition, int]:
    partitions = [
        tp for tps in (await topic_partitions(settings.kafka, names)).values() for tp in tps
    ]
    consumer = AIOKafkaConsumer(**settings.kafka.client_options())
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await consumer.stop()


async def _collect(settings: Settings, start: dict[TopicPartition, int], tally: Tally) -> None:
    """Read results and dead letters from where they ended before the demo published."""
    names = Topics.of(settings)
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(),
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        consumer.assign(list(start))
        for partition, offset in start.items():
            consumer.seek(partition, offset)
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    value = orjson.loads(record.value)
                    rid, outcome = outcome_of(record.topic, value, dict(record.headers), names)
                    new = rid in tally.published and rid not in tally.outcome
                    bill = tally.bills.setdefault(outcome, Bill())
                    if new and record.topic == names.results:
                        bill.add(value.get("usage"), value.get("cost_usd"))
                    if rid:
                        tally.settle(rid, outcome)
    finally:
        await consumer.stop()


async def _publish(settings: Settings, tally: Tally, count: int, rate: float, seed: int) -> None:
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    names = Topics.of(settings)
    weights = [s.weight for s in SCENARIOS]
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        for index in range(count):
            scenario = rng.choices(SCENARIOS, weights)[0]
            request_id = f"demo-{run}-{index:05d}"
            value = scenario.build(request_id, rng)
            tally.published[request_id] = time.monotonic()
            tally.expected[request_id] = scenario.expect
            tally.scenario[request_id] = scenario.name
            await producer.send(
                names.requests,
                value,
                key=request_id.encode(),
                headers=[("request-id", request_id.encode())],
            )
            await anyio.sleep(1 / rate if rate > 0 else 0)
        await producer.flush()
    finally:
        await producer.stop()


def _progress_line(tally: Tally, worker: Worker, started: float) -> str:
    outcomes = Counter(tally.outcome.values())
    results = outcomes["synthetic"] + outcomes["together"]
    dead = sum(n for k, n in outcomes.items() if k not in ("synthetic", "together"))
    flying = sum(engine.snapshot().in_flight for engine in worker.engines)
    lag: dict[str, int] = defaultdict(int)
    for row in worker.monitor.rows():
        lag[row.group.rsplit("-", 1)[-1]] += row.lag or 0
    return (
        f"{time.monotonic() - started:6.1f}s  published {len(tally.published):4d}  "
        f"results {results:4d} (via Together {outcomes['together']:3d})  "
        f"dead letters {dead:3d}  in flight {flying:4d}  "
        f"lag primary {lag['primary']:4d} fallback {lag['fallback']:3d}"
    )


async def _watch(tally: Tally, worker: Worker, target: int, timeout_s: float) -> bool:
    started = time.monotonic()
    live = sys.stdout.isatty()
    with anyio.move_on_after(timeout_s):
        while len(tally.published) < target or not tally.done:
            line = _progress_line(tally, worker, started)
            print(f"\r{line}" if live else line, end="" if live else "\n", flush=True)
            await anyio.sleep(0.5 if live else 2.0)
    print(("\r" if live else "") + _progress_line(tally, worker, started), flush=True)
    return tally.done and len(tally.published) >= target


async def _reachable(settings: Settings) -> bool:
    try:
        async with admin_client(settings.kafka, doing="looking for Kafka"):
            return True
    except KafkaError:
        return False


@asynccontextmanager
async def local_kafka(settings: Settings, *, keep: bool) -> AsyncIterator[None]:
    """Use the configured cluster, or start the local broker when a loopback one is absent."""
    if await _reachable(settings):
        yield
        return
    host, _, port = settings.kafka.bootstrap_servers.partition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        raise KafkaError(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: is it "
            "running? (unset KAFKA_BOOTSTRAP_SERVERS to use a local broker)"
        )
    broker = LocalBroker(home=cache_dir() / "broker", port=int(port))
    print(f"no Kafka at {settings.kafka.bootstrap_servers}: starting a local broker…", flush=True)
    # a broker running already (or launched by another start meanwhile) is someone else's:
    # never stopped here
    ours = await anyio.to_thread.run_sync(broker.start)
    try:
        yield
    finally:
        if ours and keep:
            print(
                f"Kafka left running at {broker.bootstrap_servers} "
                "(stop it with `stream kafka stop`)"
            )
        elif ours:
            await anyio.to_thread.run_sync(broker.stop)


# Kimi-K2-Thinking is down on Synthetic (so it falls back to Together's Kimi-K2-Instruct),
# GLM-4.6 is down too (and has no fallback); everything else answers in 0.2–1.2 s.
DEMO_FAULTS = "hf:moonshotai/Kimi-K2-Thinking=rate:1:503;hf:zai-org/GLM-4.6=rate:1:500"
DEMO_LATENCY = "uniform:0.2:1.2"


def _simulated(settings: Settings, simulator: Simulator) -> Settings:
    """Point both providers at the simulator; retries kept short so the demo is brisk."""
    synthetic = replace(
        settings.synthetic,
        base_url=f"{simulator.base}/openai/v1",
        api_key=Secret("simulated"),
        max_retries=2,
    )
    together = replace(settings.together, base_url=simulator.url, api_key=Secret("simulated"))
    return replace(settings, synthetic=synthetic, together=together)


def _metrics_port(settings: Settings) -> Settings:
    """Any free port unless one was asked for: the demo must not fail on a busy 9400."""
    if "STREAM_METRICS_PORT" in os.environ:
        return settings
    return replace(settings, metrics_port=0)


async def _ready(worker: Worker, timeout_s: float) -> None:
    with anyio.fail_after(timeout_s):
        await worker.started.wait()
        for engine in worker.engines:
            await engine.ready.wait()


async def run_demo(
    settings: Settings, *, count: int, rate: float, seed: int, keep_kafka: bool, timeout_s: float
) -> bool:
    """Run the whole pipeline on a mix of `count` requests; True when all ended as expected."""
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(local_kafka(settings, keep=keep_kafka))
        changes = await topics_module.plan(settings)
        await topics_module.apply(settings, changes)
        print(
            f"topics ready on {settings.kafka.bootstrap_servers}: "
            f"{sum(c.action == 'create' for c in changes)} created"
        )
        simulated = not settings.synthetic.api_key
        if simulated:
            simulator = await stack.enter_async_context(
                Simulator(
                    SimConfig(
                        latency=parse_latency(DEMO_LATENCY),
                        seed=seed,
                        faults=parse_faults(DEMO_FAULTS),
                    )
                )
            )
            settings = _simulated(settings, simulator)
            print(f"provider simulator on {simulator.base} (Synthetic and Together)")
        else:
            urls = {settings.synthetic.base_url, settings.together.base_url}
            print(f"SYNTHETIC_API_KEY is set: calling the providers at {', '.join(sorted(urls))}")
        tally, started = Tally(), time.monotonic()
        ok = await _drive(settings, tally, count=count, rate=rate, seed=seed, timeout_s=timeout_s)
        lines, expected = summary(tally, time.monotonic() - started)
        print("\n".join(["", *lines]))
        return ok and (expected or not simulated)


async def _drive(
    settings: Settings, tally: Tally, *, count: int, rate: float, seed: int, timeout_s: float
) -> bool:
    names = Topics.of(settings)
    start = await _end_offsets(settings, [names.results, names.dead_letter])
    worker = Worker(_metrics_port(settings), ("primary", "fallback"), lag_interval_s=0.5)
    async with anyio.create_task_group() as outer:
        outer.start_soon(_collect, settings, start, tally)
        async with anyio.create_task_group() as inner:
            inner.start_soon(worker.run)
            await _ready(worker, 60)
            print(
                f"both stages running (metrics on http://127.0.0.1:{worker.port}/metrics); "
                f"publishing {count} requests"
            )
            outer.start_soon(_publish, settings, tally, count, rate, seed)
            ok = await _watch(tally, worker, count, timeout_s)
            worker.stop()
        outer.cancel_scope.cancel()
    return ok


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    if args.requests < 1:
        raise UsageError(f"--requests must be at least 1 (got {args.requests})")
    if not 0 <= args.rate < math.inf:
        raise UsageError(f"--rate must be 0 (all at once) or more per second (got {args.rate})")
    if not 0 < args.timeout < math.inf:
        raise UsageError(f"--timeout must be a positive number of seconds (got {args.timeout})")
    # The demo talks to a person: its own progress lines, plus warnings worth seeing
    # (a circuit opening), not every worker's INFO line.
    logs.configure(os.environ.get("STREAM_LOG_LEVEL", "WARNING"), json=False)
    ok = anyio.run(
        lambda: run_demo(
            settings,
            count=args.requests,
            rate=args.rate,
            seed=args.seed,
            keep_kafka=args.keep_kafka,
            timeout_s=args.timeout,
        )
    )
    return 0 if ok else 1


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="run the whole pipeline locally on a realistic mix of requests",
        description="Starts a local Kafka broker if none is reachable, applies the topics, "
        "starts the provider simulator (unless SYNTHETIC_API_KEY is set), runs both stages, "
        "publishes a mix of requests (most succeed on Synthetic, some fall back to Together, "
        "some have no fallback, a few are malformed), shows progress, prints a summary.",
    )
    parser.add_argument("--requests", type=int, default=300, help="how many (default 300)")
    parser.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="requests published per second (default 100; 0 = all at once)",
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed of the mix")
    parser.add_argument(
        "--timeout",
        type=seconds_option,
        default=300.0,
        help="give up after this long: seconds, or 10m (default 300)",
    )
    parser.add_argument(
        "--keep-kafka",
        action="store_true",
        help="leave a broker the demo started running afterwards",
    )
    parser.set_defaults(handler=_demo)
