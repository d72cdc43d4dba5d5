"""The simulator's counters and its rate-limit windows (the state behind `/sim/stats` and
the `x-ratelimit-*` headers), apart from the server that uses them.

Besides requests per model and outcome and calls in flight, it counts calls that asked the
same thing again (`repeated`), those among them whose question had been answered already
(`paid_twice`: money spent twice for certain), and, when asked to, keeps every call's start
and end (`stream bench --scenario` reads those to see which partition stopped when).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from typing import Any

import orjson

__all__ = ["RateWindow", "SimStats", "prompt_key"]


def prompt_key(messages: list[Any]) -> str:
    """A short key for what a call asks (its last message): the same question asked
    again is a call paid twice. The simulator never keeps prompts, only these."""
    last = messages[-1] if messages else None
    content = last.get("content") if isinstance(last, dict) else last
    text = content if isinstance(content, str) else orjson.dumps(content).decode()
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class SimStats:
    def __init__(self, *, trace: bool = False) -> None:
        self._trace = trace
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_model: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.by_model_outcome: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.in_flight = 0
        self.peak_in_flight = 0
        self.repeated = 0
        self.paid_twice = 0
        self._keys: set[str] = set()
        self._answered: set[str] = set()
        self._calls: list[list[Any]] = []  # [key, start, end, outcome], with `trace`

    def start(self, model: str, outcome: str, key: str) -> int:
        """Count a call and return its number (for `finish`)."""
        # Counted when decided, not when done: a hang the client gave up on is still a hang,
        # and a test reading the stats right after its call sees every request it made.
        self.requests += 1
        self.by_model[model] += 1
        self.by_outcome[outcome] += 1
        self.by_model_outcome[model][outcome] += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.repeated += key in self._keys
        self.paid_twice += key in self._answered
        self._keys.add(key)
        if self._trace:
            self._calls.append([key, time.time(), None, outcome])
        return self.requests - 1

    def finish(self, call: int, key: str, *, answered: bool) -> None:
        """The call ended: answered, failed, or its client went away (cancelled it)."""
        self.in_flight -= 1
        if answered:
            self._answered.add(key)
        if self._trace and call < len(self._calls):
            self._calls[call][2] = time.time()

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "repeated": self.repeated,
            "paid_twice": self.paid_twice,
            "by_model": dict(self.by_model),
            "by_outcome": dict(self.by_outcome),
            "by_model_outcome": {m: dict(c) for m, c in self.by_model_outcome.items()},
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
        }

    def calls(self) -> list[dict[str, Any]]:
        """Every call so far (with `trace`): key, start and end (Unix seconds; end None
        while it runs), outcome."""
        return [dict(zip(("key", "start", "end", "outcome"), c, strict=True)) for c in self._calls]


class RateWindow:
    """Fixed rate-limit windows: requests and tokens counted since the window began."""

    def __init__(
        self, *, length_s: float, request_limit: int, token_limit: int, started: float
    ) -> None:
        self._length_s = length_s
        self._request_limit = request_limit
        self._token_limit = token_limit
        self._start = started
        self.requests = self.tokens = 0

    def roll(self, now: float) -> float:
        """Start a new window if this one is over; seconds until it resets."""
        length = self._length_s
        if now - self._start >= length:
            self._start += length * ((now - self._start) // length)
            self.requests = self.tokens = 0
        return max(0.0, self._start + length - now)

    def headers(self, reset_s: float) -> dict[str, str]:
        reset = f"{reset_s:.3f}s"
        requests, tokens = self._request_limit, self._token_limit
        return {
            "x-ratelimit-limit-requests": str(requests),
            "x-ratelimit-remaining-requests": str(max(0, requests - self.requests)),
            "x-ratelimit-reset-requests": reset,
            "x-ratelimit-limit-tokens": str(tokens),
            "x-ratelimit-remaining-tokens": str(max(0, tokens - self.tokens)),
            "x-ratelimit-reset-tokens": reset,
        }
