"""ProviderClient against bare aiohttp, same run, same simulator (in its own process).

    .venv/bin/python bench/client_bench.py [--requests 5000] [--concurrency 500]
                                           [--latency 0.5] [--rounds 2] [--json]

Each run first warms its connection pool with one wave (not counted), then sends
`--requests` chat completions with `--concurrency` in flight, and reports requests/s and
CPU seconds per request of this process (the simulator's CPU is not counted). Runs
alternate (bare, client, bare, client …) so machine noise hits both alike. The process has
the worker's garbage-collector settings (`stream.worker.tune_gc`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import anyio
import orjson

from stream.catalog import Model
from stream.config import ProviderSettings, Secret
from stream.devtools import benchruns
from stream.devtools.broker import free_port
from stream.devtools.simulator import simulate_command
from stream.providers import ProviderClient
from stream.worker import tune_gc

ROOT = Path(__file__).resolve().parent.parent
MODEL = Model(id="glm-4.6-syn", provider="synthetic", api_model="hf:zai-org/GLM-4.6", timeout_s=60)
KEY = "sk-bench"

Call = Callable[[int], Awaitable[None]]


def _messages(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {index}: what is a partition?"}]


async def _drive(call: Call, requests: int, concurrency: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to run `requests` calls with `concurrency` in flight."""
    figures = await benchruns.drive(call, requests, concurrency)
    return figures["done_at"] - figures["ready_at"], figures["cpu_s"]


async def _bare(url: str, requests: int, concurrency: int) -> tuple[float, float]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def call(index: int) -> None:
            body = orjson.dumps({"model": MODEL.api_model, "messages": _messages(index)})
            async with session.post(f"{url}/chat/completions", data=body) as response:
                data = orjson.loads(await response.read())
            if response.status != 200 or not data["choices"][0]["message"]["content"]:
                raise RuntimeError(f"bare call failed: HTTP {response.status}")

        await _drive(call, concurrency, concurrency)  # warm the pool
        return await _drive(call, requests, concurrency)


async def _client(url: str, requests: int, concurrency: int) -> tuple[float, float]:
    settings = ProviderSettings(
        name="synthetic", base_url=url, api_key=Secret(KEY), max_connections=concurrency
    )
    async with ProviderClient(settings) as client:

        async def call(index: int) -> None:
            await client.complete(MODEL, _messages(index))

        await _drive(call, concurrency, concurrency)
        return await _drive(call, requests, concurrency)


def _start_simulator(port: int, latency: float) -> subprocess.Popen[bytes]:
    command = simulate_command(port, latency, "--api-key", KEY)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.readline()  # "simulator listening on …": it is ready
    return process


async def _bench(args: argparse.Namespace, url: str) -> dict[str, list[dict[str, float]]]:
    tune_gc()
    runs: dict[str, list[dict[str, float]]] = {"bare_aiohttp": [], "provider_client": []}
    kinds = (("bare_aiohttp", _bare), ("provider_client", _client))
    for _ in range(args.rounds):
        for name, run in kinds:
            wall, cpu = await run(url, args.requests, args.concurrency)
            figures = {
                "throughput": args.requests / wall,
                "cpu_ms_per_request": cpu / args.requests * 1000,
            }
            runs[name].append(figures)
            if not args.json:
                print(
                    f"{name:<16} {figures['throughput']:8.1f} req/s   "
                    f"{figures['cpu_ms_per_request']:.3f} ms CPU/request",
                    flush=True,
                )
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    port = free_port()
    simulator = _start_simulator(port, args.latency)
    try:
        runs = anyio.run(_bench, args, f"http://127.0.0.1:{port}/v1")
    finally:
        simulator.terminate()
        # wait4 rather than wait: it also says how much CPU the simulator used.
        _, _, usage = os.wait4(simulator.pid, 0)
        simulator.returncode = 0
    served = 2 * args.rounds * (args.requests + args.concurrency)
    simulator_cpu_ms = (usage.ru_utime + usage.ru_stime) / served * 1000
    best = {name: max(r["throughput"] for r in results) for name, results in runs.items()}
    ratio = best["provider_client"] / best["bare_aiohttp"]
    cpu = {
        name: statistics.median(r["cpu_ms_per_request"] for r in results)
        for name, results in runs.items()
    }
    cpu_ratio = cpu["provider_client"] / cpu["bare_aiohttp"]
    ceiling = args.concurrency / args.latency if args.latency > 0 else None  # none at L = 0
    if args.json:
        figures = {"runs": runs, "best": best, "ratio": ratio, "ceiling": ceiling}
        figures.update(cpu_ms_per_request=cpu, cpu_ratio=cpu_ratio)
        print(json.dumps({**figures, "simulator_cpu_ms_per_request": simulator_cpu_ms}))
    else:
        print(
            f"best: client {best['provider_client']:.1f} req/s, bare aiohttp "
            f"{best['bare_aiohttp']:.1f} req/s → {ratio:.1%} of bare"
            + (
                f" (ceiling {ceiling:.0f} req/s at {args.concurrency} in flight, {args.latency} s)"
                if ceiling
                else " (no latency: no Little's-law ceiling)"
            )
        )
        print(
            f"median CPU per request: client {cpu['provider_client']:.3f} ms, bare aiohttp "
            f"{cpu['bare_aiohttp']:.3f} ms → {cpu_ratio:.2f}×"
        )
        print(f"simulator process: {simulator_cpu_ms:.3f} ms CPU/request served")
    return 0


if __name__ == "__main__":
    sys.exit(main())
