"""`stream bench --scenario rolling-restart|scale-out|kill-restart`: what a deploy costs.

Real worker processes (`stream run primary`, each with its own instance id unless
`--dynamic`), the real broker, and the provider simulator at latency L (60 s by default)
keeping every call's start and end. Each scenario runs twice on fresh topics, first
undisturbed, then with its events:

    rolling-restart  SIGTERM each worker in turn (the first `--at` seconds into the
                     calls), start it again once it has exited, then the next
    scale-out        start with one worker; `--at` seconds in, start the others
    kill-restart     SIGKILL one worker `--at` seconds in, start it again at once

The workers start and settle first; then the requests are published (t0). Figures:
provider calls per request; calls paid twice (the simulator was asked the same again);
calls running on partitions that moved (abandoned: the most a move may cost); the
partitions handed over (moved once their calls finished: nothing abandoned); the longest
stop (from the simulator: the longest time, between a partition's first call and its last
result, that no call of it was running); the longest pause (from the workers' logs: the
longest time no worker took new work from a partition, from a probation or a drain until
a worker had it again; for every partition, and for those that never moved); the time
from t0 to the last result, against the undisturbed run; and for kill-restart the time
from the restart to the first call made.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
from aiokafka import AIOKafkaProducer

from stream import clientconfig
from stream.catalog import Model, load_catalog
from stream.config import Settings
from stream.devtools.benchdata import create_topics, delete_topics, results_of
from stream.devtools.benchinfra import KEY, BenchError, broker, run_prefix, simulator
from stream.devtools.fleet import Fleet, seconds, settled
from stream.devtools.simstats import prompt_key
from stream.errors import UsageError
from stream.stages import Topics

__all__ = ["SCENARIOS", "ScenarioOptions", "command", "run_scenario", "table", "worker_env"]

SCENARIOS = ("rolling-restart", "scale-out", "kill-restart")
Figures = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class ScenarioOptions:
    scenario: str
    requests: int
    latency: float
    workers: int
    concurrency: int
    partitions: int
    at: float  # seconds after t0 when the events begin
    static: bool
    guarantee: str
    folder: Path  # worker logs
    env: Mapping[str, str]  # the environment the workers start from


def _question(run: str, index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{run} question {index}: what is a rebalance?"}]


def _model(settings: Settings, latency: float) -> Model:
    """A catalog model whose timeout leaves the simulated latency room, without a fallback
    (a timeout would be a fallback, not a figure)."""
    catalog = load_catalog(settings)
    fits = [
        m
        for m in catalog.models.values()
        if m.provider == "synthetic"
        and m.timeout_s >= latency + 10
        and m.id not in catalog.fallbacks
    ]
    if not fits:
        raise BenchError(
            f"no catalog model without a fallback has a timeout over {latency + 10:g} s"
        )
    return min(fits, key=lambda m: m.timeout_s)


# -- one run -------------------------------------------------------------------------------


async def run_scenario(options: ScenarioOptions, bootstrap: str, sim: str) -> dict[str, Figures]:
    return {
        "undisturbed": await _run(options, bootstrap, sim, disturbed=False),
        options.scenario: await _run(options, bootstrap, sim, disturbed=True),
    }


def worker_env(options: ScenarioOptions, bootstrap: str, sim: str, prefix: str) -> dict[str, str]:
    """The environment of a scenario's workers."""
    return {
        # The caller's Kafka client settings (TLS, SASL: the shell's or --command-config's)
        # go to the workers; the rest of STREAM_* is the scenario's own.
        **{
            k: v
            for k, v in options.env.items()
            if not k.startswith("STREAM_") or k.startswith("STREAM_KAFKA_")
        },
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "STREAM_TOPIC_PREFIX": prefix,
        "STREAM_MAX_IN_FLIGHT": str(options.concurrency),
        "STREAM_SYNTHETIC_MAX_CONNECTIONS": str(options.concurrency),
        # Calls in flight from the start: the scenarios measure membership, not the
        # limiter's ramp (set the variable to see a restarted worker ramp up again).
        "STREAM_SYNTHETIC_INITIAL_CONCURRENCY": options.env.get(
            "STREAM_SYNTHETIC_INITIAL_CONCURRENCY", str(options.concurrency)
        ),
        "STREAM_GUARANTEE": options.guarantee,
        "SYNTHETIC_BASE_URL": f"{sim}/v1",
        "SYNTHETIC_API_KEY": KEY,
        "STREAM_METRICS_PORT": "0",
        "STREAM_METRICS_HOST": "127.0.0.1",
        "STREAM_LOG_LEVEL": "INFO",
    }


async def _run(options: ScenarioOptions, bootstrap: str, sim: str, *, disturbed: bool) -> Figures:
    run = f"{options.scenario}-{'disturbed' if disturbed else 'undisturbed'}"
    prefix = run_prefix(options.env, "scen")
    env = worker_env(options, bootstrap, sim, prefix)
    settings = Settings.from_env(env)
    folder = options.folder / run
    folder.mkdir(parents=True)
    names = [f"w{i}" for i in range(options.workers)]
    first = names[:1] if options.scenario == "scale-out" else names
    topics = await create_topics(settings, options.partitions)
    fleet = Fleet(env, folder, static=options.static)
    events: list[tuple[float, str]] = []
    try:
        for name in first:
            await fleet.start(name)
        await settled(settings, len(first))
        async with httpx.AsyncClient(timeout=30) as http:
            (await http.post(f"{sim}/sim/reset")).raise_for_status()
        model = _model(settings, options.latency)
        t0 = time.time()
        partition_of = await _publish(settings, model, run, options.requests)

        def note(text: str) -> None:
            events.append((round(time.time() - t0, 1), text))

        async with anyio.create_task_group() as group:
            if disturbed:
                group.start_soon(_EVENTS[options.scenario], fleet, names, t0 + options.at, note)
            times = await _all_results(settings, options.requests, options.latency)
        async with httpx.AsyncClient(timeout=30) as http:
            calls = (await http.get(f"{sim}/sim/calls")).json()
    finally:
        await fleet.stop_all()
        await delete_topics(settings, topics)
    logs = [e for e in fleet.events() if seconds(e["ts"]) >= t0]  # the settling is not the run
    figures = _figures(run, options, partition_of, times, calls, logs, t0)
    if options.scenario == "kill-restart" and disturbed:
        figures["first_call_after_restart_s"] = _first_call_after(events, calls, t0)
    return {**figures, "events": events, "workers": len(first), "logs": str(folder)}


async def _publish(settings: Settings, model: Model, run: str, requests: int) -> dict[str, int]:
    """Publish the requests; request id → the partition it went to."""
    producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = []
        for index in range(requests):
            rid = f"{run}-{index:06d}"
            body = {"request_id": rid, "model": model.id, "messages": _question(run, index)}
            value, key = orjson.dumps(body), rid.encode()
            futures.append((rid, await producer.send(Topics.of(settings).requests, value, key=key)))
        return {rid: (await future).partition for rid, future in futures}
    finally:
        await producer.stop()


async def _all_results(settings: Settings, requests: int, latency: float) -> dict[str, float]:
    """Request id → when its result was written (Unix seconds), once all are there."""
    with anyio.fail_after(600 + 10 * latency):
        while True:
            found = (await results_of(settings)).times
            if len(found) >= requests:
                return {key.decode(): ms / 1000 for key, ms in found.items()}
            await anyio.sleep(1.0)


# -- the events ----------------------------------------------------------------------------


async def _rolling_restart(
    fleet: Fleet, names: list[str], at: float, note: Callable[[str], None]
) -> None:
    await anyio.sleep(max(0.0, at - time.time()))
    for name in names:
        note(f"SIGTERM {name}")
        await fleet.stop(name)
        note(f"{name} exited; starting it again")
        await fleet.start(name)
        await fleet.assigned(name)
        note(f"{name} has its partitions")


async def _scale_out(
    fleet: Fleet, names: list[str], at: float, note: Callable[[str], None]
) -> None:
    await anyio.sleep(max(0.0, at - time.time()))
    note(f"starting {', '.join(names[1:])}")
    for name in names[1:]:
        await fleet.start(name)
    for name in names[1:]:
        await fleet.assigned(name)
    note(f"{len(names)} workers have partitions")


async def _kill_restart(
    fleet: Fleet, names: list[str], at: float, note: Callable[[str], None]
) -> None:
    await anyio.sleep(max(0.0, at - time.time()))
    await fleet.kill(names[0])
    note(f"SIGKILL {names[0]}; starting it again")
    await fleet.start(names[0])
    await fleet.assigned(names[0])
    note(f"{names[0]} has its partitions")


_EVENTS: dict[
    str, Callable[[Fleet, list[str], float, Callable[[str], None]], Coroutine[Any, Any, None]]
] = {
    "rolling-restart": _rolling_restart,
    "scale-out": _scale_out,
    "kill-restart": _kill_restart,
}


# -- the figures ---------------------------------------------------------------------------


def _figures(
    run: str,
    options: ScenarioOptions,
    partition_of: dict[str, int],
    results: dict[str, float],
    calls: list[dict[str, Any]],
    logs: list[dict[str, Any]],
    t0: float,
) -> Figures:
    request_of = {prompt_key(_question(run, int(rid[-6:]))): rid for rid in partition_of}
    mine = [c for c in calls if c["key"] in request_of]
    busy: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for call in mine:
        end = call["end"] if call["end"] is not None else time.time()
        busy[partition_of[request_of[call["key"]]]].append((call["start"], end))
    last: dict[int, float] = {}
    for rid, at in results.items():
        if rid in partition_of:
            last[partition_of[rid]] = max(last.get(partition_of[rid], t0), at)
    # From each partition's first call: how soon a worker fetches is not a stop.
    stops = {p: _longest_gap(min(busy[p])[0], end, busy[p]) for p, end in last.items()}
    moved = _moved(logs)
    staying = [stop for p, stop in stops.items() if p not in moved]
    pauses = _pauses(logs, last)
    staying_pauses = [pause for p, pause in pauses.items() if p not in moved]
    return {
        "requests": options.requests,
        "calls": len(mine),
        "calls_per_request": round(len(mine) / options.requests, 3),
        "calls_paid_twice": len(mine) - len({c["key"] for c in mine}),
        "abandoned_on_moved": sum(e.get("abandoned", 0) for e in logs),
        "moved_partitions": sorted(moved),
        "handed_over_partitions": sorted(_handed_over(logs)),
        "longest_stop_s": round(max(stops.values()), 1),
        "longest_stop_staying_s": round(max(staying), 1) if staying else None,
        "stop_by_partition_s": {p: round(stop, 1) for p, stop in sorted(stops.items())},
        "longest_pause_s": round(max(pauses.values(), default=0.0), 1),
        "longest_pause_staying_s": round(max(staying_pauses, default=0.0), 1),
        "total_s": round(max(results.values()) - t0, 1),
    }


def _partitions(names: list[str]) -> set[int]:
    """Request partitions among `topic[partition]` log fields."""
    found = set()
    for name in names:
        topic, _, partition = name[:-1].rpartition("[")
        if topic.endswith("predictions.requests"):
            found.add(int(partition))
    return found


def _pauses(logs: list[dict[str, Any]], last: dict[int, float]) -> dict[int, float]:
    """Per partition, the longest time, before its last result, that no worker was taking
    new work from it: from going on probation (or draining) until a worker has it again."""
    since: dict[int, float] = {}
    longest: dict[int, float] = defaultdict(float)
    for entry in sorted(logs, key=lambda e: e["ts"]):
        at = seconds(entry["ts"])
        if "kept" in entry:
            for p in _partitions(entry["kept"] + entry["new"]):
                if p in since:
                    longest[p] = max(longest[p], at - since.pop(p))
        elif "abandoned" not in entry:
            for p in _partitions(entry.get("partitions", [])):
                if at < last.get(p, 0.0):
                    since.setdefault(p, at)
    return longest


def _moved(logs: list[dict[str, Any]]) -> set[int]:
    """Request partitions some worker gave up to another (its log says they left)."""
    return {p for e in logs if "abandoned" in e for p in _partitions(e["partitions"])}


def _handed_over(logs: list[dict[str, Any]]) -> set[int]:
    """Request partitions some worker was asked to hand over (calls ran on them as balance
    moved them): they move once those calls finish, maybe after the run's last result."""
    return {
        p
        for e in logs
        if e.get("logger") == "stream.engine.handover" and e["msg"].startswith("handing")
        for p in _partitions(e["partitions"])
    }


def _longest_gap(start: float, end: float, busy: list[tuple[float, float]]) -> float:
    """The longest part of [start, end] that no interval in `busy` covers."""
    longest, cursor = 0.0, start
    for begin, finish in sorted(busy):
        longest = max(longest, min(begin, end) - cursor)
        cursor = max(cursor, finish)
    return max(longest, end - cursor)


def _first_call_after(
    events: list[tuple[float, str]], calls: list[dict[str, Any]], t0: float
) -> float | None:
    """Seconds from the restart after SIGKILL to the first call made after it."""
    restarts = [at for at, text in events if text.startswith("SIGKILL")]
    if not restarts:
        return None
    restarted = t0 + restarts[0]
    after = [c["start"] for c in calls if c["start"] > restarted]
    return round(min(after) - restarted, 1) if after else None


def table(results: dict[str, Figures], options: ScenarioOptions) -> list[str]:
    membership = "static membership" if options.static else "dynamic membership"
    lines = [
        f"stream bench --scenario {options.scenario}: {options.requests} requests, latency "
        f"{options.latency:g} s, {options.workers} workers, {options.partitions} partitions, "
        f"concurrency {options.concurrency} per worker, {membership}, {options.guarantee}",
        f"{'run':<16} {'calls/req':>9} {'paid twice':>10} {'on moved':>8} {'stop s':>7} "
        f"{'paused s':>8} {'(staying)':>9} {'total s':>8}",
    ]
    baseline = results["undisturbed"]["total_s"]
    for name, f in results.items():
        lines.append(
            f"{name:<16} {f['calls_per_request']:>9.3f} {f['calls_paid_twice']:>10} "
            f"{f['abandoned_on_moved']:>8} {f['longest_stop_s']:>7.1f} "
            f"{f['longest_pause_s']:>8.1f} {f['longest_pause_staying_s']:>9.1f} "
            f"{f['total_s']:>8.1f}  {f['total_s'] / baseline:.2f}× undisturbed"
        )
    disturbed = results[options.scenario]
    if "first_call_after_restart_s" in disturbed:
        lines.append(f"first call after the restart: {disturbed['first_call_after_restart_s']} s")
    lines += [f"  {at:6.1f} s  {text}" for at, text in disturbed["events"]]
    if disturbed["events"] and disturbed["events"][0][0] >= disturbed["total_s"]:
        lines.append(
            f"note: the events began at {disturbed['events'][0][0]:g} s, after the last result "
            f"({disturbed['total_s']:g} s): no call was in flight for them to disturb; give a "
            "smaller --at or a longer --latency"
        )
    return lines


def command(args: argparse.Namespace) -> int:
    """`stream bench --scenario …`: run it undisturbed and disturbed, print the figures."""
    env = clientconfig.environment(args, os.environ)
    with tempfile.TemporaryDirectory(prefix="stream-scenario-") as folder:
        options = ScenarioOptions(
            scenario=args.scenario,
            requests=1000 if args.requests is None else args.requests,
            latency=60.0 if args.latency is None else args.latency,
            workers=args.workers,
            concurrency=args.concurrency,
            partitions=args.partitions,
            at=args.at,
            static=not args.dynamic,
            guarantee=args.guarantee,
            folder=Path(args.keep_logs or folder),
            env=env,
        )
        if min(options.requests, options.workers, options.partitions) < 1 or options.at < 0:
            raise UsageError("--requests, --workers and --partitions must be at least 1, --at ≥ 0")
        with broker(env) as bootstrap, simulator(options.latency, "--trace") as sim:
            results = anyio.run(run_scenario, options, bootstrap, sim)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(table(results, options)))
    return 0
