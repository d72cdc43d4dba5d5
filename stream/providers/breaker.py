"""A circuit breaker per provider and model: stop calling a model that keeps failing.

    closed ──(failure rate ≥ threshold over the window, ≥ min_calls)──► open
    open ──(cool-down elapsed)──► half_open: up to `probes` calls let through
    half_open ──probe succeeds──► closed        half_open ──probe fails──► open

A pure state machine: the caller passes the time in, so it is tested without sleeping.
Only provider-side failures count; a 400 caused by our request is `neutral`.

Each call `allow` lets through carries a `Ticket` naming the state it was let through in.
A call from an older state reports on the past: a slow call sent before the breaker opened
that fails (or succeeds) after the cool-down is not the probe's verdict, and one finishing
after a re-close does not count in the fresh window. Only current tickets count.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = ["BreakerConfig", "BreakerSnapshot", "CircuitBreaker", "Outcome", "State", "Ticket"]

State = Literal["closed", "open", "half_open"]
Outcome = Literal["success", "failure", "neutral"]


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    window_s: float = 30.0
    min_calls: int = 10
    failure_rate: float = 0.5
    cooldown_s: float = 15.0
    probes: int = 1


class Ticket(NamedTuple):
    """A call `allow` let through: the state's epoch then, and whether it is a probe."""

    epoch: int
    probe: bool


class BreakerSnapshot(NamedTuple):
    state: State
    calls: int
    failures: int
    probes_in_flight: int


class CircuitBreaker:
    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self._state: State = "closed"
        self._window: deque[tuple[float, bool]] = deque()
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._epoch = 0  # bumped on every state change

    def state(self, now: float) -> State:
        if self._state == "open" and now - self._opened_at >= self.config.cooldown_s:
            self._state = "half_open"
            self._probes = 0
            self._epoch += 1
        return self._state

    def allow(self, now: float) -> Ticket | None:
        """May a call go out now? A ticket (each one in half-open is a probe) that the call
        must hand back to `record`, or None."""
        state = self.state(now)
        if state == "closed":
            return Ticket(self._epoch, probe=False)
        if state == "half_open" and self._probes < self.config.probes:
            self._probes += 1
            return Ticket(self._epoch, probe=True)
        return None

    def record(self, outcome: Outcome, now: float, ticket: Ticket) -> State:
        """Account one finished call that `allow` let through; returns the new state."""
        state = self.state(now)
        if ticket.epoch != self._epoch:
            return state  # let through in an earlier state: it says nothing about this one
        if state == "half_open":
            self._probes = max(0, self._probes - 1)
            if outcome == "success":
                self._close()
            elif outcome == "failure":
                self._open(now)
        elif state == "closed" and outcome != "neutral":
            self._add(outcome == "failure", now)
            if self._tripped():
                self._open(now)
        return self._state

    def snapshot(self, now: float) -> BreakerSnapshot:
        self._prune(now)
        return BreakerSnapshot(self.state(now), len(self._window), self._failures, self._probes)

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self._state}, calls={len(self._window)}, failures={self._failures})"
        )

    def _add(self, failed: bool, now: float) -> None:
        self._window.append((now, failed))
        self._failures += failed
        self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self.config.window_s
        while self._window and self._window[0][0] <= horizon:
            _, failed = self._window.popleft()
            self._failures -= failed

    def _tripped(self) -> bool:
        calls = len(self._window)
        return calls >= self.config.min_calls and self._failures >= self.config.failure_rate * calls

    def _open(self, now: float) -> None:
        self._state = "open"
        self._opened_at = now
        self._probes = 0
        self._epoch += 1

    def _close(self) -> None:
        # A fresh window: the failures that opened the breaker are history once a probe passed.
        self._state = "closed"
        self._window.clear()
        self._failures = 0
        self._probes = 0
        self._epoch += 1
