"""Provider faults against a running worker: hangs, resets (before and mid-body), 429
storms with long Retry-After, malformed bodies. The worker stays up, every request ends as
one terminal record, in-flight never passes STREAM_MAX_IN_FLIGHT (in the engine, and as
the provider sees it), and memory stays bounded over a long faulty run.

Synthetic models fail (by the simulator's rules for `hf:*`); Together answers. So mapped
models end as fallback results and unmapped ones as `no_fallback` dead letters.
"""

from __future__ import annotations

import os
import time

import pytest

from stream import records
from stream.devtools.faults import parse_faults
from stream.devtools.simulator import SimConfig, Simulator
from stream.worker import Worker
from tests.kit import eventually
from tests.kit.requests import request, send, terminal
from tests.kit.workers import BOTH, Peaks, simulated_settings, worker_on

pytestmark = pytest.mark.anyio

MAX_IN_FLIGHT = 8
MODELS = ("deepseek-r1-0528-syn", "kimi-k2-thinking-syn", "deepseek-v3-0324-syn")
MAPPED = {"deepseek-r1-0528-syn", "kimi-k2-thinking-syn"}


def _batch(tag: str, count: int, deadline_s: float) -> list[tuple[str, bytes]]:
    deadline = records.now_rfc3339(time.time() + deadline_s)
    return [
        (f"{tag}-{i}", request(f"{tag}-{i}", MODELS[i % 3], f"{tag} {i}", deadline=deadline))
        for i in range(count)
    ]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "faults",
    [
        "hf:*=rate:0.5:hang/30",
        "hf:*=rate:0.5:reset",
        "hf:*=rate:0.5:resetbody",
        # Retry-After 30 s is past each request's 20 s deadline: fall back now, not sleep.
        "hf:*=rate:0.95:429/30",
        "hf:*=rate:0.5:malformed",
    ],
    ids=["hang", "reset", "resetbody", "429-storm", "malformed"],
)
async def test_a_faulty_provider_still_gives_one_terminal_record_each(
    env: dict[str, str], faults: str
) -> None:
    peaks = Peaks()
    async with Simulator(SimConfig(faults=parse_faults(faults), seed=7)) as sim:
        settings = simulated_settings(env, sim, max_in_flight=MAX_IN_FLIGHT)
        async with worker_on(Worker(settings, BOTH), peaks=peaks) as worker:
            batch = _batch("f", 48, deadline_s=20)
            await send(settings, batch)
            found = await terminal(settings, len(batch))
            assert [e.snapshot().handler_errors for e in worker.engines] == [0, 0]

            async def calls_settled() -> bool:
                # A client that gave up on a hang must have closed its connection.
                return bool(sim.stats()["in_flight"] == 0)

            await eventually(calls_settled, timeout_s=15)
        stats = sim.stats()
    assert set(found) == {rid for rid, _ in batch}
    faulty = sum(n for outcome, n in stats["by_outcome"].items() if outcome != "ok")
    if "429/30" in faults:
        # A Retry-After holds back every call to that model, and 30 s is past every
        # deadline: after a model's first 429 its requests fail over without calling.
        assert 1 <= stats["by_outcome"].get("429", 0) <= 12, stats
    else:
        assert faulty >= 10  # the faults did happen
    for rid, (_, record, _) in found.items():
        model = MODELS[int(rid.rpartition("-")[2]) % 3]
        if "provider" in record and record["provider"] == "synthetic":
            continue  # the draw let it through on Synthetic
        if model in MAPPED:
            assert record.get("provider") == "together", record
        else:
            assert record["reason"] == "no_fallback", record
    assert max(peaks.engine.values()) <= MAX_IN_FLIGHT
    assert set(peaks.engine) == {"primary", "fallback"}
    # Two engines, each bounded: the provider never sees more than both bounds together.
    assert stats["peak_in_flight"] <= 2 * MAX_IN_FLIGHT


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.timeout(180)
async def test_memory_stays_bounded_over_a_long_faulty_run(env: dict[str, str]) -> None:
    # Below the breaker's 50 % failure rate, so the faults keep coming all run long.
    faults = "hf:*=rate:0.1:reset,rate:0.1:malformed,rate:0.05:500,rate:0.05:resetbody"
    peaks = Peaks()
    async with Simulator(SimConfig(faults=parse_faults(faults), seed=3)) as sim:
        settings = simulated_settings(env, sim, max_in_flight=MAX_IN_FLIGHT)
        async with worker_on(Worker(settings, BOTH), peaks=peaks):
            sizes = []
            total = 0
            for round_ in range(3):
                batch = _batch(f"m{round_}", 300, deadline_s=120)
                total += len(batch)
                await send(settings, batch)
                await terminal(settings, total)
                sizes.append(_rss_mb())
        outcomes = sim.stats()["by_outcome"]
    assert sum(n for outcome, n in outcomes.items() if outcome != "ok") >= 50, outcomes
    # The first round warms caches, pools and imports; after it, growth must be small
    # (a leak per request would show as megabytes per 300 requests).
    growth = sizes[-1] - sizes[0]
    assert growth < 25, f"RSS grew {growth:.1f} MiB over {total - 300} requests: {sizes}"
    assert max(peaks.engine.values()) <= MAX_IN_FLIGHT
