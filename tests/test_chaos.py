"""The chaos run, CI-sized: 1,000 requests with 2 worker kills, a broker restart, a
15-second Synthetic outage, a scale-out and a rolling restart (see tests/chaos.py;
`./dev chaos` runs the full 10,000). And the checker itself, on hand-made outputs: it must
see what is missing, doubled or stray."""

from __future__ import annotations

import base64
import json
import sys
from types import SimpleNamespace

import anyio
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.chaos import ChaosConfig, Checker, Input, plan
from tests.chaoscluster import longest_gaps
from tests.kit import ROOT

REQUESTS = "t.predictions.requests"


@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_chaos_run_ci_sized() -> None:
    done = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "tests.chaos",
            "--requests=1000",
            "--duration=30",
            "--kills=2",
            "--outage=15",
            # a run Kafka stalls (its skipped markers) must report before this test's 300 s
            "--settle-timeout=150",
            "--json",
        ],
        cwd=ROOT,
        check=False,
    )
    tail = done.stderr.decode()[-3000:]
    lines = done.stdout.decode().strip().splitlines()
    assert lines, f"the chaos run printed no figures (exit {done.returncode}):\n{tail}"
    figures = json.loads(lines[-1])
    skipped = figures["kafka_skipped_txn_markers"]
    if skipped and not figures["ok"] and all(_kafkas(error) for error in figures["errors"]):
        # Not ours to judge: the broker settled a transaction's outputs and offsets apart
        # (a single node restarting; reproduced without the worker by tests/txn_markers.py).
        pytest.skip(
            f"Kafka skipped {skipped} transaction markers while its only broker restarted; "
            f"exactly-once cannot be judged on this run: {figures['errors']}"
        )
    assert figures["ok"], (figures["errors"], tail)
    assert done.returncode == 0
    assert figures["inputs"] >= 1000 and figures["missing"] == figures["duplicates"] == 0
    assert figures["kills"] == 2 and figures["broker_restarts"] == 1
    # The primary stage scaled out 1 → 3 and every worker was restarted in turn, each event
    # with what it cost.
    events = {e["event"]: e for e in figures["calls_again_by_event"]}
    assert {"scale out: primary 1 → 3 workers", "rolling restart of every worker"} <= set(events)
    assert all(e["asked_again"] >= e["paid_twice"] >= 0 for e in events.values())
    kinds = figures["inputs_by_kind"]
    assert sum(n for kind, n in kinds.items() if kind != "valid") == 50  # 5 % poison
    assert kinds["duplicate_id"] > 0 and kinds["too_large"] > 0
    # The outage did send mapped models to Together and unmapped ones to dead letters.
    assert figures["results_by_provider"].get("together", 0) > 0
    assert figures["dead_letters_by_reason"].get("no_fallback", 0) > 0


def _kafkas(error: str) -> bool:
    """An error a transaction settled apart can cause: outputs doubled, or lost."""
    return error.endswith(
        ("duplicate terminal records under exactly-once", "input records have no terminal record")
    )


def _letter(item_value: bytes, reason: str, partition: int, offset: int) -> bytes:
    return orjson.dumps(
        {
            "reason": reason,
            "error": "",
            "request": None,
            "raw": base64.b64encode(item_value).decode(),
            "source": {"topic": REQUESTS, "partition": partition, "offset": offset},
        }
    )


def _result(seq: int) -> bytes:
    return orjson.dumps({"provider": "synthetic", "metadata": {"chaos": seq}})


def _checker() -> tuple[Checker, list[Input]]:
    inputs = plan(ChaosConfig(requests=40, max_too_large=1))
    checker = Checker(REQUESTS, {i.value: i for i in inputs})
    for offset, item in enumerate(inputs):
        checker.add_input(SimpleNamespace(value=item.value, partition=0, offset=offset))
    return checker, list(inputs)


def _answer_all(checker: Checker, inputs: list[Input]) -> None:
    for offset, item in enumerate(inputs):
        if item.kind in ("valid", "duplicate_id"):
            checker.add_output("result", _result(item.seq))
        else:
            reason = {
                "bad_json": "invalid_json",
                "bad_utf8": "invalid_encoding",
                "wrong_types": "invalid_request",
                "unknown_model": "unknown_model",
                "too_large": "too_large",
            }[item.kind]
            checker.add_output("dead-letter", _letter(item.value, reason, 0, offset))


def test_the_checker_passes_a_complete_run() -> None:
    checker, inputs = _checker()
    _answer_all(checker, inputs)
    assert checker.complete()
    assert checker.verdict(exactly_once=True)["ok"]


def test_the_checker_sees_missing_doubled_stray_and_lost_bytes() -> None:
    checker, inputs = _checker()
    _answer_all(checker, inputs)
    checker.add_output("result", _result(0))  # a duplicate
    assert not checker.verdict(exactly_once=True)["ok"]
    assert checker.verdict(exactly_once=False)["duplicates"] == 1
    checker.add_output("result", _result(999))  # stray
    assert checker.verdict(exactly_once=False)["stray"] == 1

    checker, inputs = _checker()
    poison = next(i for i, item in enumerate(inputs) if item.kind == "bad_json")
    checker.add_output("dead-letter", _letter(b"other bytes", "invalid_json", 0, poison))
    assert not checker.complete() or checker.errors
    assert any("lost the original" in e for e in checker.verdict(exactly_once=True)["errors"])
    assert checker.verdict(exactly_once=True)["missing"] > 0


# -- the progress clock (tests/chaoscluster.py) -----------------------------------------

times = st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=30)


def test_the_gap_after_a_fault_is_the_longest_wait_for_output() -> None:
    arrivals = [1.0, 2.0, 3.0, 12.0, 13.0, 40.0]
    # after 2.5: 3 → 12 is under way within 5 s; 13 → 40 only begins later
    assert longest_gaps(arrivals, [2.5], end=50.0, within=5.0) == [9.0]
    assert longest_gaps(arrivals, [2.5], end=50.0, within=20.0) == [27.0]
    # a fault inside a stall counts it from itself on; faults close together share one
    assert longest_gaps(arrivals, [2.5, 12.5], end=50.0) == [9.0, 27.0]
    assert longest_gaps(arrivals, [4.0, 5.0], end=50.0) == [8.0, 7.0]
    assert longest_gaps([], [5.0], end=8.0) == [3.0]  # nothing came at all


@given(times, st.floats(min_value=0, max_value=100), st.floats(min_value=0, max_value=100))
def test_another_arrival_never_lengthens_a_gap(arrivals: list[float], at: float, x: float) -> None:
    end = 120.0
    (before,) = longest_gaps(arrivals, [at], end)
    (after,) = longest_gaps([*arrivals, x], [at], end)
    assert 0 <= after <= before <= end - at


@given(times, st.floats(min_value=0, max_value=100))
def test_the_gap_covers_the_wait_for_the_first_arrival(arrivals: list[float], at: float) -> None:
    end = 120.0
    (gap,) = longest_gaps(arrivals, [at], end)
    first = min((t for t in arrivals if t > at), default=end)
    assert gap >= first - at
