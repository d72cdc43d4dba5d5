"""Adaptive concurrency per model: AIMD over the number of calls in flight.

The limit starts small (`initial`: a new worker must not burst into a subscription plan's
429s) and each success adds one, so it doubles with every round of calls, like TCP's slow
start, up to the ceiling (`max_connections`). A 429 or 503 halves it (at most once per
round of calls: the many 429s of one burst are one signal, not fifty), and successes grow it
back the same way.

Limits the provider announces are honoured before a 429 happens (`heed`): until the first
throttle, a provider announcing room for R more requests lets the limit jump to R at once
(so a generous provider is at full speed after one round trip, not after log2(max/initial)
rounds); R requests left in a window means at most R more are started before its reset,
and none left (requests or tokens) pauses new calls until the reset. A Retry-After pauses
the model's calls the same way (`pause`). A caller that gives `acquire` its deadline is
refused (None) as soon as a pause reaches past it, also one that starts while it waits: a
slot after the deadline is of no use, and the caller can fail over now.

Waiters queue FIFO and each is woken by exactly the release that frees its slot, so 1,000
callers cost O(1) per acquire and release and none can be left waiting on a free slot.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, overload

import anyio

from stream.providers.ratelimits import RateLimits

__all__ = ["DEFAULT_INITIAL", "AdaptiveLimiter", "LimiterSnapshot", "Permit"]

DEFAULT_INITIAL = 16


class LimiterSnapshot(NamedTuple):
    limit: float
    in_flight: int
    waiting: int
    paused_for_s: float


class Permit(NamedTuple):
    """One slot; `started` orders it against the last decrease (see `release`)."""

    started: float


class _Waiter:
    """A queued caller: set `event` when its slot is handed over, or it is `refused`."""

    __slots__ = ("end", "event", "refused")

    def __init__(self, end: float) -> None:
        self.end = end
        self.event = anyio.Event()
        self.refused = False


class AdaptiveLimiter:
    def __init__(
        self,
        max_limit: int,
        *,
        initial: int | None = None,
        min_limit: int = 1,
        decrease: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_limit = max(1, max_limit)
        self.min_limit = max(1, min(min_limit, self.max_limit))
        self._decrease = decrease
        self._clock = clock
        start = DEFAULT_INITIAL if initial is None else initial
        self._limit = float(min(self.max_limit, max(self.min_limit, start)))
        self._in_flight = 0
        self._waiters: deque[_Waiter] = deque()
        # At most the earliest deadline in the queue (a waiter that left may have set it):
        # a pause that ends before it refuses nobody, and costs no walk of the queue.
        self._earliest_end = math.inf
        self._last_decrease = -math.inf
        self._paused_until = -math.inf
        # Set (and replaced) when a pause is extended: callers waiting one out look again.
        self._pause_moved = anyio.Event()
        self._throttled = False  # once throttled, announced room no longer makes it jump
        # Announced: starts still allowed before `_allowance_until` (None: not announced).
        self._allowance: int | None = None
        self._allowance_until = -math.inf

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def paused_until(self) -> float:
        """When new calls may start again (clock time; in the past when not paused)."""
        return self._paused_until

    def try_acquire(self) -> Permit | None:
        """A slot now if one is free (the common case: no await, no timer), else None."""
        if self._in_flight < int(self._limit) and not self._waiters:
            if self._paused_until <= self._clock() and self._spend_allowance():
                self._in_flight += 1
                return Permit(self._clock())
        return None

    @overload
    async def acquire(self) -> Permit: ...
    @overload
    async def acquire(self, end: float) -> Permit | None: ...

    async def acquire(self, end: float = math.inf) -> Permit | None:
        """Wait for a slot; None when a pause lasts until `end` (clock time) or later, heard
        of before or while waiting. Callers bound the wait with their own deadline."""
        if not await self._wait_out_pause(end):
            return None
        if self._in_flight < int(self._limit) and not self._waiters:
            self._spend_allowance()  # there is some: the pause is waited out
            self._in_flight += 1
            return Permit(self._clock())
        waiter = _Waiter(end)
        self._waiters.append(waiter)
        self._earliest_end = min(self._earliest_end, end)
        try:
            await waiter.event.wait()
        except BaseException:
            # Cancelled: if our slot was already handed over, pass it on; else leave the queue.
            if waiter.event.is_set():
                if not waiter.refused:  # a refused waiter holds nothing
                    self._give_back()
            else:
                self._waiters.remove(waiter)
            raise
        if waiter.refused:
            return None
        # Woken holding a slot: the call that freed it may have brought a pause (its 429's
        # Retry-After, no requests left) or spent the announced allowance. Honour both.
        try:
            fits = await self._wait_out_pause(end)
        except BaseException:
            self._give_back()
            raise
        if not fits:
            self._give_back()
            return None
        self._spend_allowance()
        return Permit(self._clock())

    def release(self, permit: Permit, *, throttled: bool = False, success: bool = False) -> None:
        """Give the slot back; `throttled` (429/503) shrinks the limit, `success` grows it."""
        self._in_flight -= 1
        if throttled and permit.started >= self._last_decrease:
            # Only calls started after the last cut may cut again: one cut per round.
            self._limit = max(float(self.min_limit), self._limit * self._decrease)
            self._last_decrease = self._clock()
            self._throttled = True
        elif success:
            self._limit = min(float(self.max_limit), self._limit + 1.0)
        self._wake()

    def pause(self, seconds: float) -> None:
        """Stop starting calls for `seconds` (the provider said its quota is spent)."""
        self._pause_until(self._clock() + seconds)

    def heed(self, limits: RateLimits) -> None:
        """Take in what one response announced (see the module docstring)."""
        remaining, reset = limits.remaining_requests, limits.reset_requests_s
        if remaining is not None and reset is not None:
            if remaining == 0:
                self.pause(reset)
            self._allowance = remaining
            self._allowance_until = self._clock() + reset
        if limits.remaining_tokens == 0 and limits.reset_tokens_s is not None:
            self.pause(limits.reset_tokens_s)
        if remaining and not self._throttled:
            self._limit = max(self._limit, float(min(self.max_limit, remaining)))
            self._wake()

    def snapshot(self) -> LimiterSnapshot:
        paused = max(0.0, self._paused_until - self._clock())
        return LimiterSnapshot(self._limit, self._in_flight, len(self._waiters), paused)

    def __repr__(self) -> str:
        return f"AdaptiveLimiter(limit={self._limit:.1f}, in_flight={self._in_flight})"

    def _spend_allowance(self) -> bool:
        """One start from the announced allowance; False (and a pause) when none is left."""
        if self._allowance is None:
            return True
        if self._clock() >= self._allowance_until:
            self._allowance = None  # its window has reset
            return True
        if self._allowance <= 0:
            self._pause_until(self._allowance_until)
            return False
        self._allowance -= 1
        return True

    def _pause_until(self, until: float) -> None:
        if until <= self._paused_until:
            return
        self._paused_until = until
        self._pause_moved.set()
        self._pause_moved = anyio.Event()
        if until >= self._earliest_end:
            # Queued callers whose slot would now come after their deadline: refused now.
            kept: deque[_Waiter] = deque()
            for waiter in self._waiters:
                if waiter.end <= until:
                    waiter.refused = True
                    waiter.event.set()
                else:
                    kept.append(waiter)
            self._waiters = kept
            self._earliest_end = min((waiter.end for waiter in kept), default=math.inf)

    async def _wait_out_pause(self, end: float) -> bool:
        """Wait out pauses, also one that spending the announced allowance sets; False as
        soon as one lasts until `end` or later."""
        while True:
            if self._paused_until >= end:
                return False
            left = self._paused_until - self._clock()
            if left > 0:
                moved = self._pause_moved
                with anyio.move_on_after(left):
                    await moved.wait()
                    continue  # moved, maybe past `end`: look again
            if self._allowance is None or self._clock() >= self._allowance_until:
                return True
            if self._allowance > 0:
                return True
            self._pause_until(self._allowance_until)

    def _give_back(self) -> None:
        # A slot handed to a waiter that will not use it: the next waiter gets it.
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        # Hand slots straight to waiters (counted as in flight now) so no newcomer steals them.
        while self._waiters and self._in_flight < int(self._limit):
            self._in_flight += 1
            self._waiters.popleft().event.set()
