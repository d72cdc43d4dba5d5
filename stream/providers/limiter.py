"""Adaptive concurrency per provider: AIMD over the number of calls in flight.

The limit starts at the ceiling (`max_connections`): a healthy provider is never throttled
by us. A 429 or 503 halves it (at most once per round of calls: the many 429s of one burst
are one signal, not fifty), and each success adds one back. `x-ratelimit-remaining: 0` with
a reset time pauses new calls until the reset.

Waiters queue FIFO and each is woken by exactly the release that frees its slot, so 1,000
callers cost O(1) per acquire and release and none can be left waiting on a free slot.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import NamedTuple

import anyio

__all__ = ["AdaptiveLimiter", "LimiterSnapshot", "Permit", "ratelimit_pause"]


class LimiterSnapshot(NamedTuple):
    limit: float
    in_flight: int
    waiting: int
    paused_for_s: float


class Permit(NamedTuple):
    """One slot; `started` orders it against the last decrease (see `release`)."""

    started: float


class AdaptiveLimiter:
    def __init__(
        self,
        max_limit: int,
        *,
        min_limit: int = 1,
        decrease: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_limit = max(1, max_limit)
        self.min_limit = max(1, min(min_limit, self.max_limit))
        self._decrease = decrease
        self._clock = clock
        self._limit = float(self.max_limit)
        self._in_flight = 0
        self._waiters: deque[anyio.Event] = deque()
        self._last_decrease = -math.inf
        self._paused_until = -math.inf

    @property
    def limit(self) -> float:
        return self._limit

    def try_acquire(self) -> Permit | None:
        """A slot now if one is free (the common case: no await, no timer), else None."""
        if self._in_flight < int(self._limit) and not self._waiters:
            if self._paused_until <= self._clock():
                self._in_flight += 1
                return Permit(self._clock())
        return None

    async def acquire(self) -> Permit:
        """Wait for a slot. Callers bound the wait with their own deadline (`fail_after`)."""
        await self._wait_out_pause()
        if self._in_flight < int(self._limit) and not self._waiters:
            self._in_flight += 1
            return Permit(self._clock())
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            # Cancelled: if our slot was already handed over, pass it on; else leave the queue.
            if event.is_set():
                self._in_flight -= 1
                self._wake()
            else:
                self._waiters.remove(event)
            raise
        return Permit(self._clock())

    def release(self, permit: Permit, *, throttled: bool = False, success: bool = False) -> None:
        """Give the slot back; `throttled` (429/503) shrinks the limit, `success` grows it."""
        self._in_flight -= 1
        if throttled and permit.started >= self._last_decrease:
            # Only calls started after the last cut may cut again: one cut per round.
            self._limit = max(float(self.min_limit), self._limit * self._decrease)
            self._last_decrease = self._clock()
        elif success:
            self._limit = min(float(self.max_limit), self._limit + 1.0)
        self._wake()

    def pause(self, seconds: float) -> None:
        """Stop starting calls for `seconds` (the provider said its quota is spent)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def snapshot(self) -> LimiterSnapshot:
        paused = max(0.0, self._paused_until - self._clock())
        return LimiterSnapshot(self._limit, self._in_flight, len(self._waiters), paused)

    def __repr__(self) -> str:
        return f"AdaptiveLimiter(limit={self._limit:.1f}, in_flight={self._in_flight})"

    async def _wait_out_pause(self) -> None:
        # One sleep: a pause extended meanwhile holds back later callers, not this one.
        left = self._paused_until - self._clock()
        if left > 0:
            await anyio.sleep(left)

    def _wake(self) -> None:
        # Hand slots straight to waiters (counted as in flight now) so no newcomer steals them.
        while self._waiters and self._in_flight < int(self._limit):
            self._in_flight += 1
            self._waiters.popleft().set()


def ratelimit_pause(headers: Mapping[str, str]) -> float | None:
    """Seconds to pause when `x-ratelimit-remaining[-requests]` says 0 and a reset is given."""
    remaining = headers.get("x-ratelimit-remaining-requests", headers.get("x-ratelimit-remaining"))
    if remaining is None or remaining.strip() != "0":
        return None
    reset = headers.get("x-ratelimit-reset-requests", headers.get("x-ratelimit-reset"))
    return None if reset is None else _duration(reset.strip())


def _duration(raw: str) -> float | None:
    """`1.5`, `20ms`, `6m0s`, `1h2m3.5s` (OpenAI's style) → seconds, capped at 60."""
    try:
        return min(60.0, max(0.0, float(raw)))
    except ValueError:
        pass
    if not _DURATION.fullmatch(raw):
        return None
    total = sum(float(n) * _UNITS[u] for n, u in _PART.findall(raw))
    return min(60.0, total)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
