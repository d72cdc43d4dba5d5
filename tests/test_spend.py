"""The spend limit: the budget's arithmetic on a moved clock, then a worker held to it end to
end against the simulator's usage figures (nothing lost, no window over the limit)."""

from __future__ import annotations

import os
import random
import tracemalloc
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from stream import topics
from stream.catalog import Model, load_catalog
from stream.config import ConfigError, Settings
from stream.devtools.faults import Latency
from stream.devtools.simulator import SimConfig, Simulator
from stream.observe.lag import LagReader, LagTracker
from stream.spend import HELD, Budget
from stream.spendstate import SpendKeeper
from stream.stages import Topics
from stream.worker import Worker, spend_lanes
from tests.kit import eventually
from tests.kit.kafka import produce, read_all
from tests.kit.provider import priced
from tests.kit.requests import request
from tests.kit.workers import priced_catalog, simulated_settings, worker_on

pytestmark = pytest.mark.anyio

V3 = priced("v3")  # one micro-dollar per token
GLM = priced("glm")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _admit(budget: Budget, model: Model = V3, max_tokens: int | None = None) -> Any:
    with anyio.fail_after(1):
        return await budget.admit(model, 300, max_tokens)


async def test_calls_wait_for_room_and_the_window_frees_it() -> None:
    clock = Clock()
    budget = Budget("live", limit_usd=0.001, window_s=60, clock=clock)
    first = await _admit(budget)  # alone: its cost is not known yet
    first.settle(0.0004)
    assert budget.holds("t") is None
    second = await _admit(budget)
    assert budget.snapshot().held_usd == pytest.approx(0.0004)  # held at the dearest so far
    second.settle(0.0004)
    # 0.0008 spent: a third 0.0004 call would pass the limit, so the gate holds.
    assert budget.holds("t") == HELD and budget.snapshot().limited
    with anyio.move_on_after(0.05) as waited:
        await budget.admit(V3, 300, None)
    assert waited.cancelled_caught
    clock.now += 60  # a window later, a spend still counts: its result may be written later
    assert budget.holds("t") == HELD
    clock.now += 1  # past the window and its 1 s guard: the first spends leave
    assert budget.holds("t") is None
    (await _admit(budget)).settle(0.0004)
    assert budget.snapshot().spent_usd == pytest.approx(0.0004)


async def test_a_models_first_call_runs_alone() -> None:
    budget = Budget("live", limit_usd=1.0, window_s=60, clock=Clock())
    first = await _admit(budget)
    with anyio.move_on_after(0.05) as waited:
        await budget.admit(V3, 300, None)
    assert waited.cancelled_caught  # V3's cost is unknown until its first call settles
    other = await _admit(budget, GLM)  # another model is not held back by it
    first.settle(0.001)
    other.settle(0.001)
    await _admit(budget)


async def test_a_per_model_limit_holds_that_model_only() -> None:
    budget = Budget("live", limit_usd=None, window_s=60, model_limits={"v3": 0.001}, clock=Clock())
    (await _admit(budget)).settle(0.001)
    with anyio.move_on_after(0.05) as waited:
        await budget.admit(V3, 300, None)
    assert waited.cancelled_caught
    (await _admit(budget, GLM)).settle(0.5)
    assert budget.holds("t") is None  # no worker-wide limit: the engine is never held


async def test_max_tokens_and_the_prompt_bound_a_first_estimate() -> None:
    budget = Budget("live", limit_usd=0.0001, window_s=60, clock=Clock())
    with anyio.move_on_after(0.05) as waited:
        # 300 bytes ≈ 100 tokens + 1000 max_tokens at $1/10⁶: over the $0.0001 limit, but an
        # estimate above the whole limit still goes, alone, on an empty window.
        hold = await budget.admit(V3, 300, 1000)
    assert not waited.cancelled_caught
    assert budget.snapshot().held_usd == pytest.approx(0.0011)
    hold.settle(0.00005)


async def test_a_call_waiting_for_room_closes_the_gate_and_says_so() -> None:
    """A request's `max_tokens` can make its estimate dearer than the typical call: it
    waits for room, and the gate must then hold the engine (pausing partitions, the
    `stream_spend_limited` gauge, `held=spend_limit` for `stream lag`), not read open
    while records sit in flight making no call."""
    clock = Clock()
    budget = Budget("live", limit_usd=0.001, window_s=60, clock=clock)
    (await _admit(budget)).settle(0.0001)  # the typical call: $0.0001
    (await _admit(budget)).settle(0.0001)
    assert budget.holds("t") is None  # $0.0002 of $0.001: a typical call fits
    admitted: list[Any] = []

    async def call() -> None:
        # ~100 prompt tokens + 900 max_tokens at $1/10⁶: $0.001, over the $0.0008 left
        admitted.append(await budget.admit(V3, 300, 900))

    async with anyio.create_task_group() as group:
        group.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        assert budget.holds("t") == HELD
        assert budget.snapshot().limited
        clock.now += 62  # the window moves on: room again, the waiting call goes
        budget._wake()  # (the real clock wakes it when the spends leave the window)
    admitted[0].settle(0.0001)
    assert budget.holds("t") is None  # nothing waits, and a typical call fits again


@hypothesis_settings(deadline=None, max_examples=60)
@given(
    steps=st.lists(
        st.tuples(st.floats(0, 30), st.floats(0, 1), st.integers(1, 4)), min_size=1, max_size=60
    )
)
def test_no_window_ever_spends_more_than_the_limit(steps: list[tuple[float, float, int]]) -> None:
    """Calls that cost at most the dearest seen so far never take a window over the limit."""
    clock = Clock()
    budget = Budget("live", limit_usd=1.0, window_s=10, clock=clock)
    spent: list[tuple[float, float]] = []
    dearest = 0.3
    open_holds: list[Any] = []

    async def run() -> None:
        nonlocal dearest
        first = await budget.admit(V3, 1, None)
        first.settle(dearest)
        spent.append((clock.now, dearest))
        for advance, fraction, burst in steps:
            clock.now += advance
            for hold in open_holds:
                cost = dearest * fraction
                hold.settle(cost)
                spent.append((clock.now, cost))
            open_holds.clear()
            for _ in range(burst):
                with anyio.move_on_after(0.001):
                    open_holds.append(await budget.admit(V3, 1, None))

    anyio.run(run)
    for end, _ in spent:
        window = sum(cost for at, cost in spent if end - 10 < at <= end)
        assert window <= 1.0 + 1e-9


def test_a_spend_limit_with_unpriced_models_does_not_start(env: dict[str, str]) -> None:
    settings = Settings.from_env({**env, "STREAM_SPEND_LIMIT_USD": "5"})
    with pytest.raises(ConfigError, match="glm-4.6-syn.*have no price"):
        spend_lanes(settings, load_catalog(settings))
    for bad in ({"STREAM_SPEND_WINDOW": "soon"}, {"STREAM_SPEND_LIMIT_USD": "-1"}):
        with pytest.raises(ConfigError):
            Settings.from_env({**env, **bad})
    assert Settings.from_env({**env, "STREAM_SPEND_WINDOW": "24h"}).spend.window_s == 86400


# --- end to end -------------------------------------------------------------------------

LIMIT_USD = 0.0004
WINDOW_S = 2.0
REQUESTS = 80
MODEL = "deepseek-v3-0324-syn"
# The defaults leave three models unpriced; a spend limit needs every model priced.


def _max_window(results: list[dict[str, Any]], window_s: float) -> float:
    spend = sorted(
        (datetime.fromisoformat(r["completed_at"]).timestamp(), r["cost_usd"]) for r in results
    )
    return max(sum(c for t, c in spend if end - window_s < t <= end) for end, _ in spend)


@pytest.mark.timeout(120)
async def test_the_spend_limit_holds_a_worker_and_loses_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    catalog = priced_catalog(tmp_path)
    async with Simulator(SimConfig(latency=Latency("fixed", 0.05))) as sim:
        settings = simulated_settings(
            {
                **env,
                "STREAM_SPEND_LIMIT_USD": str(LIMIT_USD),
                "STREAM_SPEND_WINDOW": f"{WINDOW_S}s",
                "STREAM_COMMIT_INTERVAL_S": "0.2",
                "STREAM_CATALOG_FILE": str(catalog),
            },
            sim,
            max_in_flight=64,
        )
        await topics.apply(settings, await topics.plan(settings))
        names = Topics.of(settings)
        await produce(
            settings,
            names.requests,
            [
                request(f"s-{i:03d}", MODEL, f"Question {i}: what is a budget?")
                for i in range(REQUESTS)
            ],
        )
        worker = Worker(settings, ("primary",))
        held_seen: set[str | None] = set()
        limited_seen: set[float] = set()
        results: list[dict[str, Any]] = []
        async with anyio.create_task_group() as group:
            group.start_soon(worker.run)
            await worker.started.wait()

            async def watch() -> None:
                async with LagReader(settings.kafka) as reader, httpx.AsyncClient() as http:
                    tracker = LagTracker()
                    while True:
                        group = worker.engines[0].group_id
                        reading = await reader.read({group: [names.requests, names.backfill]})
                        rows = tracker.update(reading)
                        held_seen.update(row.held for row in rows)
                        scrape = await http.get(f"http://127.0.0.1:{worker.port}/metrics")
                        for line in scrape.text.splitlines():
                            if line.startswith('stream_spend_limited{budget="live"}'):
                                limited_seen.add(float(line.split()[-1]))
                        await anyio.sleep(0.1)

            group.start_soon(watch)

            async def all_done() -> bool:
                results[:] = [
                    orjson.loads(r.value) for r in await read_all(settings, names.results)
                ]
                return len(results) >= REQUESTS

            await eventually(all_done, timeout_s=90)
            worker.stop()
            group.cancel_scope.cancel()
    assert sorted(r["request_id"] for r in results) == [f"s-{i:03d}" for i in range(REQUESTS)]
    total = sum(r["cost_usd"] for r in results)
    assert total > 3 * LIMIT_USD  # it needed several windows: the limit did hold it back
    # completed_at is stamped a little after the spend settles: allow that much slack.
    assert _max_window(results, WINDOW_S - 0.3) <= LIMIT_USD + 1e-9
    assert 1.0 in limited_seen  # exported while held
    assert HELD in held_seen  # and `stream lag` saw why the partition did not move


async def test_a_call_cancelled_in_flight_counts_what_it_held() -> None:
    budget = Budget("live", limit_usd=1.0, window_s=60, clock=Clock())
    (await _admit(budget)).settle(0.25)
    hold = await _admit(budget)  # held at 0.25, the dearest so far
    hold.settle(None)  # nobody will say what the provider billed
    hold.settle(0.0)  # settled once: a second settle changes nothing
    assert budget.snapshot().spent_usd == pytest.approx(0.5)
    assert budget.snapshot().held_usd == 0.0


def test_a_busy_window_keeps_its_spend_in_bounded_memory() -> None:
    """800 calls a second through a 1 h window: what the budget keeps stays small, and its
    figures stay exact. (An entry per call took ~100 bytes each: 2.9 million for an hour,
    and summing them all again each time one left stalled the worker.)"""
    clock = Clock()
    budget = Budget("live", limit_usd=1e9, window_s=3600, clock=clock)
    rate, calls = 800, 120_000  # two and a half minutes of it

    async def run() -> None:
        (await _admit(budget)).settle(0.001)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(calls):
                clock.now += 1 / rate
                (await budget.admit(V3, 300, None)).settle(0.001)  # room for it: no wait
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert kept < 1_000_000, f"{kept:,} bytes kept for {calls:,} spends"
        assert budget.snapshot().spent_usd == pytest.approx(0.001 * (calls + 1))
        clock.now += 3600 + 1 - calls / rate / 2  # the first half of the spends leave
        spent, slot_usd = budget.snapshot().spent_usd, 3600 / 1000 * rate * 0.001
        # never gone early; late by at most a slot (a thousandth of the window)
        assert 0.001 * calls / 2 - 1e-6 <= spent <= 0.001 * calls / 2 + slot_usd

    anyio.run(run)


async def test_a_call_dearer_than_the_whole_limit_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    budget = Budget("live", limit_usd=0.00001, window_s=30, clock=clock)
    for _ in range(2):
        (await _admit(budget, max_tokens=2000)).settle(0.00005)
        clock.now += 32  # the next window
    said = [r.getMessage() for r in caplog.records if "more than the whole limit" in r.getMessage()]
    assert len(said) == 1, said
    assert "a call to v3 may cost $0.0021" in said[0] and "$1e-05 per 30 s" in said[0]


@pytest.mark.timeout(120)
async def test_a_restarted_worker_goes_on_with_the_spend_window(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A worker held by its limit stops (a deploy, a crash loop); the next one on the same
    state folder takes its window up, and the two together stay within the limit. (It
    started from nothing: a worker restarting again and again spent its limit once per
    start.)"""
    async with Simulator(SimConfig(latency=Latency("fixed", 0.05))) as sim:
        settings = simulated_settings(
            {
                **env,
                "STREAM_SPEND_LIMIT_USD": str(LIMIT_USD),
                "STREAM_SPEND_WINDOW": "5m",
                "STREAM_CATALOG_FILE": str(priced_catalog(tmp_path)),
            },
            sim,
            max_in_flight=8,
        )
        await topics.apply(settings, await topics.plan(settings))
        results = Topics.of(settings).results
        asks = [request(f"r-{i:02d}", MODEL, f"Question {i}: how long?") for i in range(40)]
        await produce(settings, Topics.of(settings).requests, asks)
        first = Worker(settings, ("primary",))
        async with worker_on(first):
            await eventually(lambda: _settled_at_limit(first.spend.live), timeout_s=60)
        paid_first = sum(
            orjson.loads(r.value)["cost_usd"] for r in await read_all(settings, results)
        )

        second = Worker(settings, ("primary",))
        async with worker_on(second):
            await eventually(lambda: _holds(second.engines[0].snapshot().assigned > 0))
            await anyio.sleep(2)  # time enough for a window's worth of calls, had it room
            taken_up = second.spend.live.snapshot()
        paid = sum(orjson.loads(r.value)["cost_usd"] for r in await read_all(settings, results))
    assert 0.7 * LIMIT_USD < paid_first  # the first did fill the window
    assert taken_up.spent_usd >= paid_first - 1e-12  # the second began with it
    assert paid <= LIMIT_USD + 1e-9  # both together: within one window's limit
    (kept,) = (tmp_path / "state").glob("spend.*.live.json")
    assert orjson.loads(kept.read_bytes())["budget"] == "live"


async def _holds(value: bool) -> bool:
    return value


async def _settled_at_limit(budget: Budget) -> bool:
    """Held by the limit with nothing in flight, and still so a moment later: the window is
    as full as it gets. (Held alone is not: admission counts a call at its `max_tokens`
    bound, and the answers settle for less, which opens room again.)"""
    before = budget.snapshot()
    if not before.limited or before.held_usd:
        return False
    await anyio.sleep(0.5)
    after = budget.snapshot()
    return after.limited and not after.held_usd and after.spent_usd == before.spent_usd


async def test_the_kept_window_ages_locks_and_survives_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    spender = Budget("live", limit_usd=1.0, window_s=60, clock=clock)
    keeper = SpendKeeper(tmp_path, "p.w/1", (spender,))
    keeper.open()
    (await _admit(spender)).settle(0.25)
    clock.now += 30
    (await _admit(spender)).settle(0.5)
    keeper.save()

    # another worker of the same name on this machine: memory only, said so
    rival = Budget("live", limit_usd=1.0, window_s=60)
    second = SpendKeeper(tmp_path, "p.w/1", (rival,))
    second.open()
    second.close()
    assert rival.snapshot().spent_usd == 0.0
    assert "another worker on this machine keeps its spend window" in caplog.text
    keeper.close()

    def taken_up(age_s: float) -> float:
        budget = Budget("live", limit_usd=1.0, window_s=60)
        (path,) = tmp_path.glob("spend.p.w_1.live.json")
        state = orjson.loads(path.read_bytes())
        state["saved_at"] -= age_s  # as if written `age_s` ago
        path.write_bytes(orjson.dumps(state))
        later = SpendKeeper(tmp_path, "p.w/1", (budget,))
        later.open()
        later.close()
        return budget.snapshot().spent_usd

    assert taken_up(0) == pytest.approx(0.75)
    assert taken_up(40) == pytest.approx(0.5)  # the first spend is 70 s old now: gone
    assert taken_up(60) == 0.0
    (tmp_path / "spend.p.w_1.live.json").write_bytes(b'{"version": 1, "slots": [[1, {"m": -5')
    assert taken_up_fresh(tmp_path) == 0.0
    assert "is unreadable" in caplog.text


def taken_up_fresh(folder: Path) -> float:
    budget = Budget("live", limit_usd=1.0, window_s=60)
    keeper = SpendKeeper(folder, "p.w/1", (budget,))
    keeper.open()
    keeper.close()
    return budget.snapshot().spent_usd


async def test_a_call_dearer_than_the_limit_does_not_close_the_gate_for_good() -> None:
    """The engine's gate took the dearest call seen whole: one call dearer than the limit
    closed it on an empty window, for ever. Such a call goes alone on an empty window, as
    admission lets it; and holds that left a float's remainder (1e-18) behind them must
    not keep the gate shut at the limit's edge, nothing held and nothing spent."""
    clock = Clock()
    budget = Budget("live", limit_usd=0.01, window_s=10, clock=clock)
    (await _admit(budget, GLM)).settle(0.05)  # billed 5 times the limit
    assert budget.holds("t") == HELD  # its spend is in the window
    clock.now += 12  # …and left it
    assert budget.holds("t") is None
    first = await _admit(budget)  # V3's first call, alone; then calls of odd sizes at once
    first.settle(0.0)
    rng = random.Random(1)
    for _ in range(20):  # rounds of calls that all fail unbilled, settled in any order
        holds = [await budget.admit(V3, rng.randint(1000, 3000), None) for _ in range(8)]
        rng.shuffle(holds)
        for hold in holds:
            hold.settle(0.0)
        assert budget.snapshot().held_usd == 0.0 and budget.snapshot().spent_usd == 0.0
        assert budget.holds("t") is None


def test_a_hostile_state_folder_is_a_warning_never_a_stop_or_a_write_elsewhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file without its keys (an operator "resetting" it), a FIFO where the file goes (it
    hung start-up), a huge file, a symlink where the next file is written (it was written
    through): each is a warning, and the worker goes on with its window in memory."""
    path = tmp_path / "spend.w.live.json"

    def taken_up() -> float:
        budget = Budget("live", limit_usd=1.0, window_s=60)
        keeper = SpendKeeper(tmp_path, "w", (budget,))
        keeper.open()
        budget.restore([(0.0, {"m": 0.1})])  # something to write
        budget.changes += 1
        keeper.close()
        return budget.snapshot().spent_usd

    path.write_bytes(b'{"version": 1, "slots": []}')  # no saved_at
    assert taken_up() == pytest.approx(0.1)
    assert "is unreadable ('saved_at')" in caplog.text
    path.unlink()
    os.mkfifo(path)
    assert taken_up() == pytest.approx(0.1)  # and it did not wait for a writer
    assert "not a regular file" in caplog.text
    path.unlink()
    path.write_bytes(b" " * (5 * 1024 * 1024))
    assert taken_up() == pytest.approx(0.1)
    assert "over 4,194,304" in caplog.text
    path.unlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "spend.w.live.json.new").symlink_to(victim)
    taken_up()
    assert victim.read_text() == "keep me"
    assert "writing the spend window to" in caplog.text
