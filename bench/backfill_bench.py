"""Live latency with and without a large backfill running: what the live-first lane buys.

    .venv/bin/python bench/backfill_bench.py [--backfill 50000] [--live-rate 50]
                                             [--seconds 30] [--latency 0.2] [--concurrency 200]

Starts its own broker unless KAFKA_BOOTSTRAP_SERVERS is set, the provider simulator in its
own process, and one `stream run primary` worker process. Two scenarios, each on fresh
topics: live requests only; then the same live requests while the backfill topic holds a
backlog of `--backfill` requests. Live latency is the result record's timestamp minus the
request's (both set by Kafka producers on this machine). The worker is the real product
(`stream run primary`), so the figure includes Kafka, the engine and the HTTP client.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import orjson
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream import topics
from stream.config import Settings
from stream.devtools.broker import LocalBroker, free_port
from stream.devtools.simulator import simulate_command
from tests.kit.kafka import read_all
from tests.kit.requests import request


@contextmanager
def _process(command: list[str], env: dict[str, str], log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _publish(settings: Settings, topic: str, ids: list[str], rate: float) -> None:
    producer = AIOKafkaProducer(**settings.kafka.client_options(), linger_ms=5)
    await producer.start()
    try:
        start = time.monotonic()
        for index, rid in enumerate(ids):
            if rate > 0:
                await anyio.sleep(max(0.0, start + index / rate - time.monotonic()))
            await producer.send(topic, request(rid, "deepseek-v3-0324-syn"), key=rid.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _latencies_ms(settings: Settings, ids: set[str]) -> list[float]:
    sent = {
        orjson.loads(r.value)["request_id"]: r.timestamp
        for r in await read_all(settings, settings.topic("predictions.requests"))
    }
    done = {}
    for record in await read_all(settings, settings.topic("predictions.results")):
        rid = orjson.loads(record.value)["request_id"]
        if rid in ids:
            done[rid] = record.timestamp - sent[rid]
    return sorted(float(v) for v in done.values())


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def scenario(
    base: dict[str, str], args: argparse.Namespace, backfill: int, sim_url: str, logs: Path
) -> dict[str, float]:
    env = {
        **base,
        "STREAM_TOPIC_PREFIX": f"bf{uuid.uuid4().hex[:6]}.",
        "STREAM_MAX_IN_FLIGHT": str(args.concurrency),
        "STREAM_METRICS_PORT": "0",
        "SYNTHETIC_BASE_URL": f"{sim_url}/openai/v1",
        "SYNTHETIC_API_KEY": "bench",
        "TOGETHER_BASE_URL": f"{sim_url}/v1",
        "TOGETHER_API_KEY": "bench",
    }
    settings = Settings.from_env(env)
    await topics.apply(settings, await topics.plan(settings))
    await _publish(
        settings,
        settings.topic("predictions.backfill"),
        [f"b-{i}" for i in range(backfill)],
        rate=0,
    )
    live = [f"l-{i}" for i in range(int(args.live_rate * args.seconds))]
    command = [sys.executable, "-m", "stream", "run", "primary"]
    with _process(command, env, logs / f"worker-{backfill}.log"):
        await anyio.sleep(5)  # the worker joins its group and starts on the backlog first
        started = time.monotonic()
        await _publish(settings, settings.topic("predictions.requests"), live, args.live_rate)
        await anyio.sleep(args.latency * 5 + 2)  # the last live requests finish
        elapsed = time.monotonic() - started
    latencies = await _latencies_ms(settings, set(live))
    results = await read_all(settings, settings.topic("predictions.results"))
    return {
        "live": len(live),
        "live_done": len(latencies),
        "p50_ms": _pct(latencies, 0.5),
        "p99_ms": _pct(latencies, 0.99),
        "max_ms": latencies[-1] if latencies else 0.0,
        "backfill_done": sum(1 for r in results if r.key and r.key.startswith(b"b-")),
        "seconds": elapsed,
    }


async def main(args: argparse.Namespace) -> None:
    home = Path(tempfile.mkdtemp(prefix="backfill-bench-"))
    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = LocalBroker(home=home / "kafka", port=free_port())
        await anyio.to_thread.run_sync(broker.start)
        bootstrap = broker.bootstrap_servers
    base = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    port = free_port()
    simulate = simulate_command(port, args.latency)
    try:
        with _process(simulate, base, home / "simulator.log"):
            await anyio.sleep(2)
            url = f"http://127.0.0.1:{port}"
            for backfill in (0, args.backfill):
                figures = await scenario(base, args, backfill, url, home)
                print(
                    f"backfill {backfill:>6}: live {figures['live_done']}/{figures['live']} "
                    f"p50 {figures['p50_ms']:.0f} ms  p99 {figures['p99_ms']:.0f} ms  "
                    f"max {figures['max_ms']:.0f} ms;  backfill done meanwhile "
                    f"{figures['backfill_done']}",
                    flush=True,
                )
    finally:
        if broker is not None:
            await anyio.to_thread.run_sync(broker.stop)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backfill", type=int, default=50_000)
    parser.add_argument("--live-rate", type=float, default=50.0, help="live requests/s")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long live runs")
    parser.add_argument("--latency", type=float, default=0.2, help="simulated provider latency")
    parser.add_argument("--concurrency", type=int, default=200)
    anyio.run(main, parser.parse_args())
