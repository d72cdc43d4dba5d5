"""`stream bench`: how close the pipeline gets to the bound Little's law sets, C / L.

LLM calls are slow, so throughput is concurrency over provider latency; what the product
adds is Kafka and Python. The bench measures that on the real broker (a local one on a free
port unless KAFKA_BOOTSTRAP_SERVERS is set) and the provider simulator (its own process),
one run per process (`python -m stream.devtools.bench _run MODE`, see `stream.devtools.benchruns`):

    stream        the real worker          naive        one record at a time per partition
    bare_http     ProviderClient, no Kafka bare_aiohttp bare aiohttp, no Kafka
    passthrough   the engine, no HTTP

Kafka runs get their N requests published before their process starts (a backlog), so the
clock runs from the moment the consumer has its partitions to the last result's record
timestamp. Latency: from that moment (or the request's timestamp, if later) to the result's
timestamp, the same "all N submitted at once" as the HTTP runs, whose clock is their own.

`--repeat N` runs the whole set N times, interleaved, and reports medians and spreads
(`stream.devtools.benchreport`); `--profile DIR` samples each run's process with py-spy
over its measured interval (`stream.devtools.benchruns`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import anyio

from stream import clientconfig
from stream.config import Settings, seconds_option
from stream.devtools import benchprofile, benchreport, benchruns, processes, scenarios
from stream.devtools.benchdata import (
    create_topics,
    delete_topics,
    max_window_spend,
    publish,
    results_of,
)
from stream.devtools.benchinfra import KEY as _KEY
from stream.devtools.benchinfra import BenchError, run_prefix
from stream.devtools.benchinfra import broker as _broker
from stream.devtools.benchinfra import sim_calls as _sim_calls
from stream.devtools.benchinfra import simulator as _simulator
from stream.errors import UsageError

__all__ = ["main", "register"]

_NAIVE_BUDGET_S = 10.0  # the naive loop is slow: give it about this long, not all N

Figures = benchreport.Figures


@dataclass(frozen=True, kw_only=True)
class Options:
    requests: int
    latency: float
    concurrency: int
    partitions: int
    runs: tuple[str, ...]
    guarantee: str
    naive_requests: int
    json: bool
    spend_limit: float | None
    spend_window: float
    repeat: int = 1
    profile: Path | None = None
    profiler: str = "py-spy"
    # the environment the runs start from: this process's, with --bootstrap-server and
    # --command-config laid over it (the runs are child processes that read it)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def requests_for(self, mode: str) -> int:
        """All the requests, but the naive loop only about _NAIVE_BUDGET_S of its work."""
        if mode != "naive":
            return self.requests
        if self.naive_requests:
            return self.naive_requests
        # One call per partition at a time: about P / L per second.
        rate = self.partitions / (self.latency + 0.01)
        return min(self.requests, max(2 * self.partitions, int(rate * _NAIVE_BUDGET_S)))

    @classmethod
    def of(cls, args: argparse.Namespace) -> Options:
        env = clientconfig.environment(args, os.environ)
        given = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "env"}
        options = cls(**given, env=env)
        least = (options.requests, options.concurrency, options.partitions, options.repeat)
        if min(least) < 1:
            raise UsageError(
                "--requests, --concurrency, --partitions and --repeat must be at least 1"
            )
        if not 0 <= options.latency < math.inf:
            raise UsageError("--latency must be a number of seconds, not negative")
        if options.spend_limit is not None and not options.spend_limit > 0:
            raise UsageError("--spend-limit must be a positive number of USD")
        if not options.spend_window > 0:
            raise UsageError("--spend-window must be a positive number of seconds")
        return options


# -- one run -------------------------------------------------------------------------------


class Infra(NamedTuple):
    bootstrap: str
    sim: str
    round: int = 0  # of --repeat, from 1


def _child_env(options: Options, infra: Infra, prefix: str, mode: str) -> dict[str, str]:
    concurrency = str(options.concurrency)
    bootstrap, sim = infra.bootstrap, infra.sim
    return {
        **options.env,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "STREAM_TOPIC_PREFIX": prefix,
        "STREAM_MAX_IN_FLIGHT": concurrency,
        "STREAM_MAX_IN_FLIGHT_PER_PARTITION": options.env.get(
            "STREAM_MAX_IN_FLIGHT_PER_PARTITION", concurrency
        ),
        "STREAM_SYNTHETIC_MAX_CONNECTIONS": concurrency,
        "STREAM_GUARANTEE": options.guarantee,
        "SYNTHETIC_BASE_URL": f"{sim}/v1",
        "SYNTHETIC_API_KEY": _KEY,
        "STREAM_METRICS_PORT": "0",
        "STREAM_METRICS_HOST": "127.0.0.1",
        "STREAM_LOG_LEVEL": options.env.get("STREAM_LOG_LEVEL", "WARNING"),
        **_spend_env(options),
        **benchprofile.env(options.profile, options.profiler, f"{mode}-{infra.round}"),
    }


def _spend_env(options: Options) -> dict[str, str]:
    if options.spend_limit is None:
        return {}
    # A spend limit needs every catalog model priced; the bench calls one (BENCH_MODEL, at
    # its default price) and prices the three without a default at 0 (never called here).
    catalog = Path(tempfile.gettempdir()) / f"stream-bench-catalog-{os.getpid()}.toml"
    catalog.write_text(
        "[prices]\n"
        + "".join(
            f'"{m}" = {{ input = 0, output = 0 }}\n'
            for m in ("glm-4.6-syn", "minimax-m2-syn", "qwen3-coder-480b-syn")
        )
    )
    return {
        "STREAM_SPEND_LIMIT_USD": repr(options.spend_limit),
        "STREAM_SPEND_WINDOW": f"{options.spend_window}s",
        "STREAM_CATALOG_FILE": str(catalog),
    }


def _timeout_s(mode: str, requests: int, options: Options) -> float:
    """Generous: a run that takes this long is broken, not slow."""
    width = options.partitions if mode == "naive" else options.concurrency
    return 120.0 + 3 * requests * (options.latency + 0.005) / width + requests / 200


async def _child(mode: str, requests: int, env: dict[str, str], timeout_s: float) -> Figures:
    command = [
        sys.executable,
        "-m",
        "stream.devtools.bench",
        "_run",
        mode,
        "--requests",
        str(requests),
    ]
    process = await anyio.open_process(
        command, env=env, stdin=subprocess.DEVNULL, stderr=sys.stderr
    )
    try:
        with anyio.fail_after(timeout_s):
            assert process.stdout is not None
            output = b"".join([chunk async for chunk in process.stdout])
            await process.wait()
    except TimeoutError:
        raise BenchError(f"the {mode} run did not finish in {timeout_s:.0f} s") from None
    finally:
        # a run stopped early (Ctrl-C, SIGTERM, a timeout) is ended, not left running
        code = await processes.end_async(process)
    lines = output.decode().strip().splitlines()
    if code != 0 or not lines:
        raise BenchError(f"the {mode} run failed (exit {code})")
    figures: Figures = json.loads(lines[-1])
    return figures


def _latency_figures(requests: int, seconds: Sequence[float]) -> Figures:
    ordered = sorted(seconds)
    if len(ordered) < requests:
        raise BenchError(f"only {len(ordered)} of {requests} requests finished")

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    elapsed = max(ordered[-1], 1e-6)
    return {
        "throughput": round(requests / elapsed, 1),
        "first_ms": round(ordered[0] * 1000, 1),  # how soon the first wave came back
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
    }


async def _kafka_run(mode: str, requests: int, options: Options, infra: Infra) -> Figures:
    prefix = f"{run_prefix(options.env, 'bench')}{mode}."
    env = _child_env(options, infra, prefix, mode)
    settings = Settings.from_env(env)
    names = await create_topics(settings, options.partitions)
    try:
        await publish(settings, requests, prefix)
        calls = _sim_calls(infra.sim)
        figures = await _child(mode, requests, env, _timeout_s(mode, requests, options))
        figures["calls_per_request"] = round((_sim_calls(infra.sim) - calls) / requests, 3)
        found = await results_of(settings)
    finally:
        await delete_topics(settings, names)
    ready_ms = figures["ready_at"] * 1000
    seconds = [max(0.0, (ts - ready_ms) / 1000) for ts in found.times.values()]
    figures["cpu_ms_per_request"] = round(figures["cpu_s"] / requests * 1000, 4)
    if mode != "passthrough":
        figures.update(found.bill.figures())
        most, windows = max_window_spend(found.spend, options.spend_window)
        figures.update(max_window_spend_usd=round(most, 6), spend_windows=windows)
        figures.update(spend_limit_usd=options.spend_limit, spend_window_s=options.spend_window)
    return {**_latency_figures(requests, seconds), **figures}


async def _http_run(mode: str, requests: int, options: Options, infra: Infra) -> Figures:
    env = _child_env(options, infra, "", mode)
    calls = _sim_calls(infra.sim)
    figures = await _child(mode, requests, env, _timeout_s(mode, requests, options))
    figures["calls_per_request"] = round((_sim_calls(infra.sim) - calls) / requests, 3)
    latencies = figures.pop("latencies_s")
    figures["cpu_ms_per_request"] = round(figures["cpu_s"] / requests * 1000, 4)
    return {**_latency_figures(requests, latencies), **figures}


async def _bench(options: Options, bootstrap: str, sim: str) -> dict[str, Figures]:
    results: dict[str, list[Figures]] = {mode: [] for mode in options.runs}
    for round_ in range(options.repeat):
        for mode in options.runs:
            requests = options.requests_for(mode)
            if not options.json:
                of = f" (round {round_ + 1} of {options.repeat})" if options.repeat > 1 else ""
                print(f"running {mode} ({requests} requests){of}…", file=sys.stderr, flush=True)
            run = _kafka_run if mode in benchruns.KAFKA_RUNS else _http_run
            infra = Infra(bootstrap, sim, round_ + 1)
            results[mode].append(await run(mode, requests, options, infra))
    return benchreport.summarise(
        results,
        latency=options.latency,
        concurrency=options.concurrency,
        partitions=options.partitions,
    )


# -- presentation --------------------------------------------------------------------------


def _table(results: dict[str, Figures], options: Options) -> list[str]:
    bound = f"{options.concurrency / options.latency:.0f}/s" if options.latency else "none"
    header = (
        f"stream bench: latency {options.latency} s, concurrency {options.concurrency}, "
        f"{options.partitions} partitions, {options.guarantee}; bound C/L = {bound}"
    )
    lines = benchreport.table(results, header=header, rounds=options.repeat)
    stream = results.get("stream", {})
    if "spend_usd" in stream:
        lines.append(
            f"stream tokens: prompt {stream['prompt_tokens']:,} (cached "
            f"{stream['cached_tokens']:,}), completion {stream['completion_tokens']:,} "
            f"(reasoning {stream['reasoning_tokens']:,}); spend ${stream['spend_usd']:.4f}"
        )
        window = f"{options.spend_window:g} s"
        most = f"most spent in any {window}: ${stream['max_window_spend_usd']:.6f}"
        if options.spend_limit is not None:
            lines.append(
                f"spend limit ${options.spend_limit:g} per {window}: {most} over "
                f"{stream['spend_windows']} windows; {stream['requests']} of "
                f"{stream['requests']} requests answered"
            )
    if options.profile:
        lines.extend(benchprofile.said(options.profile, options.profiler, options.requests))
    return lines


def _parse_runs(text: str) -> tuple[str, ...]:
    runs = tuple(run.strip() for run in text.split(",") if run.strip())
    unknown = [run for run in runs if run not in benchruns.RUNS]
    if unknown or not runs:
        raise argparse.ArgumentTypeError(f"runs are a comma list of {', '.join(benchruns.RUNS)}")
    return runs


def _command(args: argparse.Namespace, settings: Settings) -> int:
    # SIGTERM (`timeout 60 stream bench`) ends the bench as Ctrl-C does: every process
    # it started is stopped on the way out
    with processes.interruptible():
        return _bench_command(args)


def _bench_command(args: argparse.Namespace) -> int:
    if args.scenario:
        return scenarios.command(args)
    args.requests = 5000 if args.requests is None else args.requests
    args.latency = 1.0 if args.latency is None else args.latency
    options = Options.of(args)
    if options.profile is not None:
        if options.profiler == "py-spy":
            benchruns.check_profiler()
        options.profile.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _broker(options.env) as bootstrap, _simulator(options.latency) as sim:
        results = anyio.run(_bench, options, bootstrap, sim)
    if options.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(_table(results, options)))
        print(f"(bench took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure throughput and latency against the naive, HTTP and Kafka baselines",
        description="Runs N requests through the real worker, a naive one-at-a-time loop, a "
        "bare HTTP loop (no Kafka) and an engine pass-through (no HTTP), each in its own "
        "process, on a real broker and the provider simulator; prints requests/s, end-to-end "
        "p50/p99, provider calls per request, CPU and peak RSS, and the ratios between them.",
    )
    parser.add_argument("--requests", type=int, help="N (default 5000; scenarios 1000)")
    parser.add_argument(
        "--latency", type=float, help="simulated provider latency, s (default 1; scenarios 60)"
    )
    parser.add_argument("--concurrency", type=int, default=1000, help="C (default 1000)")
    parser.add_argument("--partitions", type=int, default=6, help="P (default 6)")
    parser.add_argument(
        "--runs",
        type=_parse_runs,
        default=benchruns.RUNS,
        help=f"comma list of runs (default all: {','.join(benchruns.RUNS)})",
    )
    parser.add_argument(
        "--guarantee", choices=["at-least-once", "exactly-once"], default="at-least-once"
    )
    parser.add_argument(
        "--naive-requests",
        type=int,
        default=0,
        help=f"requests for the naive run (default: about {_NAIVE_BUDGET_S:.0f} s of its work)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every run, interleaved; figures are the medians, with min–max (default 1)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="sample each run's process with py-spy (--native) over its measured interval; "
        "collapsed stacks to DIR/<run>-<id>.txt (py-spy is in the dev extras)",
    )
    parser.add_argument(
        "--profiler",
        choices=("py-spy", "cprofile"),
        default="py-spy",
        help="with --profile: py-spy's samples, or cProfile (every call counted, each made "
        "dearer: it ranks): DIR/<run>-<id>.prof, and the stream run's own time per request "
        "beyond bare_http's, by package",
    )
    parser.add_argument("--json", action="store_true", help="figures keyed by run, as JSON")
    parser.add_argument(
        "--spend-limit",
        type=float,
        default=None,
        help="USD per --spend-window for the worker (STREAM_SPEND_LIMIT_USD); default none",
    )
    parser.add_argument(
        "--spend-window",
        type=seconds_option,
        default=60.0,
        help="the spend limit's sliding window, and the summary's: seconds, or 5m, 1h (default 60)",
    )
    scenario = parser.add_argument_group(
        "membership scenarios",
        "With --scenario: real `stream run primary` processes, run undisturbed and then "
        "through the scenario; prints provider calls per request, calls paid twice, the "
        "longest time a partition stopped, and total time against the undisturbed run.",
    )
    scenario.add_argument(
        "--scenario",
        choices=scenarios.SCENARIOS,
        help="rolling-restart: SIGTERM each worker in turn and start it again; scale-out: "
        "one worker, then --workers; kill-restart: SIGKILL one worker and start it again",
    )
    scenario.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    scenario.add_argument(
        "--at",
        type=seconds_option,
        default=5.0,
        help="how far into the calls the events begin: seconds, or 1m (default 5)",
    )
    scenario.add_argument(
        "--dynamic", action="store_true", help="no instance ids (dynamic membership), to compare"
    )
    scenario.add_argument("--keep-logs", metavar="DIR", help="keep the workers' logs in DIR")
    parser.set_defaults(handler=_command)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m stream.devtools.bench _run MODE --requests N`: one run, its figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m stream.devtools.bench")
    parser.add_argument("action", choices=["_run"])
    parser.add_argument("mode", choices=benchruns.RUNS)
    parser.add_argument("--requests", type=int, required=True)
    args = parser.parse_args(argv)
    from stream import logs

    processes.die_with_parent()  # a bench that was SIGKILLed leaves no run behind
    settings = Settings.from_env()
    logs.configure(settings.log_level, json=False, content=settings.log_content)
    figures = anyio.run(benchruns.run, args.mode, settings, args.requests)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
