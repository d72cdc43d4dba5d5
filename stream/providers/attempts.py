"""What one attempt's outcome means, as pure functions of it: the breaker's verdict and the
limiter's signal (`judge`), the limits the answer announced (`heed`), a slot within the
deadline (`acquire`), what a call has been billed across its attempts (`Run`), and the
waits before a call goes out that a shutdown may withdraw (`Waits`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from stream.errors import RecordReleased
from stream.providers.breaker import Outcome
from stream.providers.completion import Parsed
from stream.providers.http import Exchange, Failure
from stream.providers.limiter import AdaptiveLimiter, Permit
from stream.providers.ratelimits import MAX_RESET_S, read_ratelimits
from stream.release import Release
from stream.release import current as release_of_record

__all__ = ["Run", "Waits", "acquire", "heed", "judge", "max_tokens"]


@dataclass
class Run:
    """One `complete` call across its attempts: what it has been billed, and the last id."""

    cost_usd: float | None = None  # None until an answer was priced
    request_id: str | None = None
    sending: bool = False  # a request is out and its answer not read
    calls: int = 0  # attempts that went out to the provider (not those refused a slot)
    answered: int = 0  # attempts the provider answered with a 200 it may bill, usable or not


class Waits:
    """The client's waits before a call goes out: for the spend limit, a free slot, a pause
    the provider asked for, a back-off, a probe's verdict. `withdraw` (a worker's shutdown)
    ends each of those whose call has no answer billed yet, and every one begun after: they
    raise `RecordReleased`, so the drain does not wait on them and the next owner runs the
    record (nothing was paid). A wait of a call that was answered (a 200 it could not use,
    billed) is not withdrawn: running that record again would pay again."""

    def __init__(self) -> None:
        self._stop = Release()  # the worker's: every record's waits, at a shutdown

    def withdraw(self) -> int:
        """End the withdrawable waits; how many were waiting."""
        return self._stop.ask()

    @contextmanager
    def bounded(self, run: Run, timeout: float | None) -> Iterator[anyio.CancelScope]:
        """A cancel scope over one wait, with `timeout` (None: none): its
        `cancelled_caught` says the time ran out; a withdrawal, or the release of the
        record's partition (`stream.release`: it is being handed over), raises
        `RecordReleased`."""
        releases: list[tuple[Release, str]] = []
        if run.answered == 0:  # withdrawable: nothing billed yet
            releases.append((self._stop, _STOPPING))
            if (own := release_of_record.get()) is not None:
                releases.append((own, _HANDED_OVER))
        _raise_if_asked(releases)
        scope = anyio.CancelScope() if timeout is None else anyio.move_on_after(timeout)
        for release, _ in releases:
            release.waits.add(scope)
        try:
            with scope:
                yield scope
        finally:
            for release, _ in releases:
                release.waits.discard(scope)
        if scope.cancelled_caught:
            _raise_if_asked(releases)


def _raise_if_asked(releases: list[tuple[Release, str]]) -> None:
    for release, why in releases:
        if release.asked:
            raise RecordReleased(why)


_STOPPING = "the worker is stopping: the call was waiting to go out"
_HANDED_OVER = "its partition is being handed over: the call was waiting to go out"


async def acquire(
    limiter: AdaptiveLimiter, end: float, now: Callable[[], float], waits: Waits, run: Run
) -> Permit | Failure:
    permit = limiter.try_acquire()
    if permit is not None:
        return permit
    waited: Permit | None = None
    with waits.bounded(run, end - now()) as scope:
        waited = await limiter.acquire(end)
    if scope.cancelled_caught:
        return Failure(retryable=True, error_type="deadline", message="no slot in time")
    if waited is None:
        # The provider asked for a pause that outlasts this request (known already, or
        # heard of while it waited): fail over now (the wait it carries tells the retry
        # loop that trying again cannot fit either).
        return Failure(
            retryable=True,
            error_type="rate_limited",
            message="the provider's rate limit resets after the deadline",
            wait_s=limiter.paused_until - now(),
        )
    return waited


def heed(limiter: AdaptiveLimiter, exchange: Exchange) -> None:
    """Announced limits ride on successes too: the last call before the wall is a 200.
    A Retry-After holds back every call to the model, not just the one that got it, for at
    most `MAX_RESET_S` (a day-long Retry-After, or a broken one, then costs one call to find
    out again; the request that got it still fails over when it does not fit its deadline)."""
    if exchange.headers is not None:
        limiter.heed(read_ratelimits(exchange.headers))
    result = exchange.result
    if isinstance(result, Failure) and result.status == 429 and result.wait_s:
        limiter.pause(min(result.wait_s, MAX_RESET_S))


def judge(result: Parsed | Failure) -> tuple[Outcome, bool]:
    """(breaker outcome, limiter throttled) for one attempt's result, as it was read."""
    if isinstance(result, Parsed):
        return "success", False
    return ("failure" if result.provider_fault else "neutral"), result.throttled


def max_tokens(params: dict[str, Any] | None) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = (params or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
