"""The OpenAI-compatible client for one provider: one call, retried inside its deadline.

    complete ─► breaker gate ─► _retry_loop ─► _attempt ─► limiter ─► ProviderHTTP.send
                                     ▲              └─► Parsed | Failure
                                     └── wait: Retry-After, else backoff; never past the end

Each model has its own `_ModelState` (breaker, limiter, the probe's verdict, the breaker
state last reported): a model that is down answers 503 for itself, and must not open the
breaker or shrink the concurrency of the provider's healthy models. The HTTP half (pool,
POST, reading the answer) is `stream.providers.http`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import httpx
import orjson

from stream.catalog import Model
from stream.config import ProviderSettings
from stream.errors import (
    CircuitOpenError,
    FatalProviderError,
    ProviderError,
    RetryableProviderError,
)
from stream.providers.breaker import BreakerConfig, CircuitBreaker, Outcome, State, Ticket
from stream.providers.clock import Clock
from stream.providers.completion import Completion, Parsed, wants_json
from stream.providers.http import Exchange, Failure, ProviderHTTP
from stream.providers.limiter import AdaptiveLimiter, Permit, ratelimit_pause
from stream.providers.observer import ProviderObserver
from stream.providers.retry import Backoff, classify

__all__ = ["ProviderClient"]

logger = logging.getLogger(__name__)

# Statuses that mean "too many calls": the limiter shrinks on them.
_THROTTLES = frozenset({429, 503, 529})


@dataclass(eq=False)
class _ModelState:
    """What the client keeps about one model at its provider."""

    breaker: CircuitBreaker
    limiter: AdaptiveLimiter
    reported: State = "closed"  # the breaker state last logged and observed
    # Set when a half-open probe decides; calls waiting on the probe wake on it.
    verdict: anyio.Event = field(default_factory=anyio.Event)


class ProviderClient:
    def __init__(
        self,
        settings: ProviderSettings,
        *,
        observer: ProviderObserver | None = None,
        breaker: BreakerConfig | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.provider = settings.name
        self._observer = observer
        self._breaker_config = breaker or BreakerConfig(cooldown_s=settings.breaker_cooldown_s)
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._clock = clock or Clock()
        self._models: dict[str, _ModelState] = {}
        self._http = ProviderHTTP(settings, transport=transport, clock=self._clock)

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        limits = {model: round(state.limiter.limit) for model, state in self._models.items()}
        return f"ProviderClient({self.provider} {self.settings.base_url}, limits={limits})"

    def limiter(self, model: Model) -> AdaptiveLimiter:
        """The adaptive concurrency limit of one model at this provider."""
        return self._state(model).limiter

    def breaker_state(self, model: Model) -> State:
        """The breaker's state for `model` now. Reading it reports nothing: a state change
        is logged and observed once, by the call that acts on it."""
        return self._state(model).breaker.state(self._clock.monotonic())

    async def complete(
        self,
        model: Model,
        messages: list[dict[str, Any]],
        params: dict[str, Any] | None = None,
        *,
        deadline: float | None = None,
        request_id: str | None = None,
    ) -> Completion:
        """Run one chat completion, retrying inside min(deadline, model.timeout_s).

        Raises `RetryableProviderError` (retries or time used up), `FatalProviderError`,
        or `CircuitOpenError` (not called at all).
        """
        started = self._clock.monotonic()
        end = started + self._budget(model, deadline)
        if end <= started:
            failure = Failure(retryable=True, error_type="deadline", message="deadline passed")
            raise self._error(model, failure, 0)
        body = self._body(model, messages, params)
        parsed, attempts = await self._retry_loop(model, body, wants_json(params), end, request_id)
        return Completion(
            content=parsed.content,
            reasoning=parsed.reasoning,
            usage=parsed.usage,
            provider=self.provider,
            provider_model=parsed.served_model or model.api_model,
            attempts=attempts,
            latency_ms=(self._clock.monotonic() - started) * 1000.0,
        )

    def _budget(self, model: Model, deadline: float | None) -> float:
        budget = model.timeout_s
        if deadline is not None:
            budget = min(budget, deadline - self._clock.wall())
        return budget

    def _body(
        self, model: Model, messages: list[dict[str, Any]], params: dict[str, Any] | None
    ) -> bytes:
        # Streaming is not supported; model and messages cannot be overridden by params.
        extra = {k: v for k, v in (params or {}).items() if k not in ("stream", "model")}
        return orjson.dumps({**extra, "model": model.api_model, "messages": messages})

    async def _retry_loop(
        self, model: Model, body: bytes, json_output: bool, end: float, request_id: str | None
    ) -> tuple[Parsed, int]:
        attempt = 0
        last: Failure | None = None
        while True:
            ticket = self._gate(model)
            if ticket is None:
                if await self._probe_passed(model, end):
                    continue
                raise self._circuit_open(model, last, attempt)
            attempt += 1
            result = await self._attempt(model, ticket, body, json_output, end, request_id, attempt)
            if isinstance(result, Parsed):
                return result, attempt
            last = result
            wait = self._next_wait(result, attempt, end)
            if wait is None:
                raise self._error(model, result, attempt)
            if self._observer:
                self._observer.on_retry(self.provider, model.id, result.error_type)
            await anyio.sleep(wait)

    def _circuit_open(self, model: Model, last: Failure | None, attempts: int) -> ProviderError:
        if last is not None:
            # It was called, and failed: the failure says more than the breaker does.
            return self._error(model, last, attempts, note="circuit opened; not retried")
        return CircuitOpenError(
            f"{self.provider} {model.api_model}: circuit open, not called",
            provider=self.provider,
            model=model.api_model,
            error_type="circuit_open",
            attempts=0,
        )

    def _next_wait(self, failure: Failure, attempt: int, end: float) -> float | None:
        """Seconds before the next attempt, or None when the loop must stop now."""
        if not failure.retryable or attempt > self.settings.max_retries:
            return None
        wait = failure.wait_s
        if wait is None:
            wait = self._backoff.delay(attempt, self._rng)
        # Sleeping into the deadline would only buy an attempt with no time to run.
        return wait if self._clock.monotonic() + wait < end else None

    async def _probe_passed(self, model: Model, end: float) -> bool:
        """Half-open: wait (within the budget) for the probe's verdict instead of failing.

        After an outage the first call is a probe and the rest would fail at once; a burst
        (a re-drive, a backlog) would then dead-letter wholesale just as the provider came
        back. Open (still cooling down) still fails fast, which is what the fallback needs.
        """
        state = self._state(model)
        if state.breaker.state(self._clock.monotonic()) != "half_open":
            return False
        verdict = state.verdict
        with anyio.move_on_after(end - self._clock.monotonic()):
            await verdict.wait()
        return verdict.is_set()

    def _gate(self, model: Model) -> Ticket | None:
        state = self._state(model)
        now = self._clock.monotonic()
        self._report(model, state, state.breaker.state(now))  # open → half_open on reading
        return state.breaker.allow(now)

    def _state(self, model: Model) -> _ModelState:
        state = self._models.get(model.id)
        if state is None:
            state = self._models[model.id] = _ModelState(
                breaker=CircuitBreaker(self._breaker_config),
                limiter=AdaptiveLimiter(self.settings.max_connections, clock=self._clock.monotonic),
            )
        return state

    def _report(self, model: Model, state: _ModelState, now_state: State) -> None:
        """Log and observe each breaker state change once, whoever acted on it first."""
        before = state.reported
        if before == now_state:
            return
        state.reported = now_state
        logger.warning(
            "circuit %s → %s for %s %s", before, now_state, self.provider, model.api_model
        )
        if self._observer:
            self._observer.on_breaker(self.provider, model.id, now_state)

    async def _attempt(
        self,
        model: Model,
        ticket: Ticket,
        body: bytes,
        json_output: bool,
        end: float,
        request_id: str | None,
        attempt: int,
    ) -> Parsed | Failure:
        """One call; the breaker and the limiter hear its outcome whatever happens."""
        state = self._state(model)
        permit: Permit | None = None
        outcome: Outcome = "neutral"
        throttled = False
        try:
            permit = await self._acquire(state.limiter, end)
            if permit is None:
                return Failure(retryable=True, error_type="deadline", message="no slot in time")
            exchange = await self._http.send(body, json_output, end)
            outcome, throttled = self._judge(exchange.result)
        finally:
            self._settle(model, state, ticket, permit, outcome, throttled)
        self._heed(state, exchange)
        self._note_attempt(model, exchange, request_id, attempt)
        return exchange.result

    async def _acquire(self, limiter: AdaptiveLimiter, end: float) -> Permit | None:
        permit = limiter.try_acquire()
        if permit is not None:
            return permit
        try:
            with anyio.fail_after(end - self._clock.monotonic()):
                return await limiter.acquire()
        except TimeoutError:
            return None

    @staticmethod
    def _heed(state: _ModelState, exchange: Exchange) -> None:
        """Quota headers ride on successes too: the last call before the wall is a 200."""
        if exchange.headers is None:
            return
        pause = ratelimit_pause(exchange.headers)
        if pause:
            state.limiter.pause(pause)

    @staticmethod
    def _judge(result: Parsed | Failure) -> tuple[Outcome, bool]:
        """(breaker outcome, limiter throttled) for one attempt's result."""
        if isinstance(result, Parsed):
            return "success", False
        status = result.status
        if status is None or status == 200:
            # Transport failures and unusable 200s are the provider's; bad JSON may be ours.
            return ("neutral" if result.error_type == "invalid_json_output" else "failure"), False
        verdict = classify(status, None, None)
        throttled = status in _THROTTLES and result.error_type != "insufficient_quota"
        return ("failure" if verdict.provider_fault else "neutral"), throttled

    def _settle(
        self,
        model: Model,
        state: _ModelState,
        ticket: Ticket,
        permit: Permit | None,
        outcome: Outcome,
        throttled: bool,
    ) -> None:
        if permit is not None:
            state.limiter.release(permit, throttled=throttled, success=outcome == "success")
        self._report(model, state, state.breaker.record(outcome, self._clock.monotonic(), ticket))
        if ticket.probe:
            # A probe finished: wake the calls waiting on it; they gate again (closed: go,
            # open: fail fast, still half-open: one of them probes next).
            state.verdict.set()
            state.verdict = anyio.Event()

    def _note_attempt(
        self, model: Model, exchange: Exchange, request_id: str | None, attempt: int
    ) -> None:
        if self._observer:
            self._observer.on_attempt(self.provider, model.id, exchange.label, exchange.seconds)
        result = exchange.result
        what = "ok" if isinstance(result, Parsed) else result.error_type
        logger.debug(
            "attempt %d on %s %s: %s (%s) in %.3fs",
            attempt,
            self.provider,
            model.api_model,
            what,
            exchange.label,
            exchange.seconds,
            extra={"request_id": request_id},
        )

    def _error(
        self, model: Model, failure: Failure, attempts: int, *, note: str = ""
    ) -> ProviderError:
        kind = RetryableProviderError if failure.retryable else FatalProviderError
        status = f"HTTP {failure.status}" if failure.status else failure.error_type
        text = f"{self.provider} {model.api_model}: {status}: {failure.message}"
        text += f" (after {attempts} attempt{'s' if attempts != 1 else ''})"
        if note:
            text += f"; {note}"
        return kind(
            self._http.scrub(text),
            provider=self.provider,
            model=model.api_model,
            status=failure.status,
            error_type=failure.error_type,
            attempts=attempts,
        )
