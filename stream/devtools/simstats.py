"""The simulator's counters and its rate-limit windows (the state behind `/sim/stats` and
the `x-ratelimit-*` headers), apart from the server that uses them."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

__all__ = ["RateWindow", "SimStats"]


class SimStats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_model: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.by_model_outcome: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.in_flight = 0
        self.peak_in_flight = 0

    def start(self, model: str, outcome: str) -> None:
        # Counted when decided, not when done: a hang the client gave up on is still a hang,
        # and a test reading the stats right after its call sees every request it made.
        self.requests += 1
        self.by_model[model] += 1
        self.by_outcome[outcome] += 1
        self.by_model_outcome[model][outcome] += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def finish(self) -> None:
        self.in_flight -= 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_model": dict(self.by_model),
            "by_outcome": dict(self.by_outcome),
            "by_model_outcome": {m: dict(c) for m, c in self.by_model_outcome.items()},
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
        }


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
