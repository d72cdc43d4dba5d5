"""What `stream demo` publishes and how it keeps score: a weighted mix of request kinds,
each with the terminal record it should end as, and the tally and summary of a run."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from stream.prices import Bill
from stream.stages import Topics

__all__ = ["SCENARIOS", "Scenario", "Tally", "outcome_of", "summary"]

PROMPTS = [
    "Summarise the causes of the 1929 stock market crash in three sentences.",
    "Write a Python function that merges two sorted lists.",
    "Explain consumer lag in Kafka to a new on-call engineer.",
    "Translate 'exactly once' into French, German and Japanese.",
    "Give three test cases for a leap-year function.",
]


@dataclass(frozen=True)
class Scenario:
    """One kind of request in the mix, and the terminal record it should end as."""

    name: str
    weight: int
    expect: str  # "synthetic", "together" or a dead-letter reason
    build: Callable[[str, random.Random], bytes]


def _request(
    model: str, params: dict[str, Any] | None = None
) -> Callable[[str, random.Random], bytes]:
    def build(request_id: str, rng: random.Random) -> bytes:
        body: dict[str, Any] = {
            "request_id": request_id,
            "model": model,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "metadata": {"source": "demo"},
        }
        if params:
            body["params"] = params
        return orjson.dumps(body)

    return build


def _raw(value: bytes) -> Callable[[str, random.Random], bytes]:
    return lambda request_id, rng: value


SCENARIOS = (
    Scenario("deepseek-r1 on Synthetic", 30, "synthetic", _request("deepseek-r1-0528-syn")),
    Scenario("deepseek-v3 on Synthetic", 20, "synthetic", _request("deepseek-v3-0324-syn")),
    Scenario(
        "qwen3-coder on Synthetic",
        15,
        "synthetic",
        _request("qwen3-coder-480b-syn", {"temperature": 0.2}),
    ),
    Scenario("minimax-m2 on Synthetic", 10, "synthetic", _request("minimax-m2-syn")),
    Scenario(
        "kimi-k2-thinking: Synthetic down → Together",
        12,
        "together",
        _request("kimi-k2-thinking-syn"),
    ),
    Scenario("glm-4.6: Synthetic down, no fallback", 6, "no_fallback", _request("glm-4.6-syn")),
    Scenario("unknown model", 2, "unknown_model", _request("gpt-17-syn")),
    Scenario("not JSON", 2, "invalid_json", _raw(b'{"request_id": "oops", "model": ')),
    Scenario("not UTF-8", 1, "invalid_encoding", _raw(b"\xff\xfe\x00garbage")),
    Scenario(
        "missing messages",
        2,
        "invalid_request",
        _raw(b'{"request_id": "x", "model": "deepseek-r1-0528-syn"}'),
    ),
)


@dataclass
class Tally:
    """What the demo published, and the terminal record each request ended as."""

    published: dict[str, float] = field(default_factory=dict)  # request id → monotonic time
    expected: dict[str, str] = field(default_factory=dict)
    scenario: dict[str, str] = field(default_factory=dict)
    outcome: dict[str, str] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    bills: dict[str, Bill] = field(default_factory=dict)  # outcome → tokens and spend

    def settle(self, request_id: str, outcome: str) -> None:
        if request_id not in self.published:
            return  # an earlier run's record
        if request_id in self.outcome:
            self.duplicates += 1
            return
        self.outcome[request_id] = outcome
        self.latency_s[request_id] = time.monotonic() - self.published[request_id]

    @property
    def done(self) -> bool:
        return len(self.outcome) >= len(self.published)


def outcome_of(
    topic: str, value: dict[str, Any], headers: dict[str, bytes], names: Topics
) -> tuple[str | None, str]:
    if topic == names.results:
        return value.get("request_id"), str(value.get("provider"))
    rid = value.get("request_id") or headers.get("request-id", b"").decode() or None
    return rid, str(value.get("reason"))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(tally: Tally, elapsed_s: float) -> tuple[list[str], bool]:
    """The summary table, and whether every request ended as its scenario expects."""
    by_outcome: dict[str, list[str]] = defaultdict(list)
    for rid, outcome in tally.outcome.items():
        by_outcome[outcome].append(rid)
    lines = [
        f"{'outcome':<34} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'tokens':>8} {'USD':>8}"
    ]
    labels = {"synthetic": "result · Synthetic", "together": "result · Together (fallback)"}
    for outcome in sorted(by_outcome, key=lambda o: (o not in labels, o)):
        ids = by_outcome[outcome]
        latencies = [tally.latency_s[rid] * 1000 for rid in ids]
        label = labels.get(outcome, f"dead letter · {outcome}")
        bill = tally.bills.get(outcome, Bill())
        lines.append(
            f"{label:<34} {len(ids):>8} {_percentile(latencies, 0.5):>8.0f} "
            f"{_percentile(latencies, 0.99):>8.0f} {bill.prompt + bill.completion:>8,} "
            f"{bill.usd:>8.4f}"
        )
    missing = [rid for rid in tally.published if rid not in tally.outcome]
    wrong = [rid for rid, outcome in tally.outcome.items() if outcome != tally.expected[rid]]
    lines.append(
        f"{len(tally.published)} requests → {len(tally.outcome)} terminal records in "
        f"{elapsed_s:.1f} s; missing {len(missing)}, duplicates {tally.duplicates}, "
        f"unexpected outcomes {len(wrong)}"
    )
    total = Bill()
    for bill in tally.bills.values():
        total.merge(bill)
    failed = "failed attempts are in stream_provider_spend_usd_total"
    lines.append(f"{total.line()} (results; {failed})")
    for rid in wrong[:5]:
        lines.append(f"  unexpected: {tally.scenario[rid]} ended as {tally.outcome[rid]}")
    return lines, not missing and not wrong
