"""The OpenAI-compatible client for one provider: one call, retried inside its deadline.

    complete ─► spend gate ─► _retry_loop ─► breaker gate ─► _attempt ─► limiter ─► send
                                   ▲                                └─► Parsed | Failure
                                   └── wait: Retry-After, else backoff; never past the end

Money first: with a `SpendGate`, a call waits for the spend limit before its budget starts
(a paused spend limit must not eat the model's timeout), up to the request's deadline.
A wait the provider asks for (Retry-After, or a quota announced spent) pauses the model's
calls; one that does not fit the request's deadline fails at once, so the request goes to
its fallback instead of sleeping into a refusal. A worker that stops withdraws the calls
still waiting to go out (`withdraw_waiting`): their records go back unpaid, for the next
owner, instead of holding the drain.

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

from stream import compact
from stream.catalog import Model
from stream.config import ProviderSettings
from stream.errors import (
    CircuitOpenError,
    FatalProviderError,
    ProviderError,
    RetryableProviderError,
)
from stream.providers.attempts import Waits, acquire, heed, judge, max_tokens
from stream.providers.breaker import BreakerConfig, CircuitBreaker, Outcome, State, Ticket
from stream.providers.charges import Tab, UsageWarnings, charge
from stream.providers.clock import Clock
from stream.providers.completion import Completion, Parsed, wants_json
from stream.providers.http import Exchange, Failure, ProviderHTTP
from stream.providers.limiter import AdaptiveLimiter, Permit
from stream.providers.observer import Hold, ProviderObserver, SpendGate
from stream.providers.refusals import RefusalLog
from stream.providers.retry import Backoff

__all__ = ["ProviderClient"]

logger = logging.getLogger(__name__)


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
        self._usage = UsageWarnings(self.provider)
        self._refusals = RefusalLog(self.provider)
        self._http = ProviderHTTP(settings, transport=transport, clock=self._clock)
        self._waits = Waits()

    async def __aenter__(self) -> ProviderClient:
        await self._http.open()
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

    def withdraw_waiting(self) -> int:
        """The worker is stopping: every call still waiting to go out (for the spend limit,
        a slot, a pause, a back-off) and every one that would wait from now on raises
        `RecordReleased`, unless an answer of it was billed. Calls already out run on.
        Returns how many were waiting."""
        return self._waits.withdraw()

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
        spend: SpendGate | None = None,
    ) -> Completion:
        """Run one chat completion, retrying inside min(deadline, model.timeout_s).

        Raises `RetryableProviderError` (retries or time used up), `FatalProviderError`,
        or `CircuitOpenError` (not called at all).
        """
        body = self._body(model, messages, params)
        del messages  # the body holds the prompt now: not a second copy while the call is out
        run = Tab()
        hold = await self._admit(spend, model, body, params, deadline, run)
        # One coroutine for the whole call, not a helper per step: each level is a frame
        # per call in flight (10,000 in flight: ~3 MB a level).
        try:
            started = self._clock.monotonic()
            end = started + self._budget(model, deadline)
            if end <= started:
                failure = Failure(retryable=True, error_type="deadline", message="deadline passed")
                raise self._error(model, failure, 0, run)
            json_output = wants_json(params)
            parsed, attempts = await self._retry_loop(
                model, body, json_output, end, request_id, run
            )
            return Completion(
                content=parsed.content,
                reasoning=parsed.reasoning,
                usage=parsed.usage,
                provider=self.provider,
                provider_model=parsed.served_model or model.api_model,
                attempts=attempts,
                latency_ms=(self._clock.monotonic() - started) * 1000.0,
                finish_reason=parsed.finish_reason,
                tool_calls=parsed.tool_calls,
                provider_request_id=parsed.response_id,
                cost_usd=run.reported_usd,
            )
        finally:
            if hold is not None:
                hold.settle(run.spent(hold.estimate))

    async def _admit(
        self,
        spend: SpendGate | None,
        model: Model,
        body: bytes,
        params: dict[str, Any] | None,
        deadline: float | None,
        run: Tab,
    ) -> Hold | None:
        """Wait for the spend limit, up to the request's deadline (not the model's timeout)."""
        if spend is None:
            return None
        wait = None if deadline is None else deadline - self._clock.wall()
        with self._waits.bounded(run, wait):
            return await spend.admit(model, len(body), max_tokens(params))
        failure = Failure(
            retryable=True, error_type="deadline", message="deadline passed under the spend limit"
        )
        raise self._error(model, failure, 0, run)

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
        return compact.dumps({**extra, "model": model.api_model, "messages": messages})

    async def _retry_loop(
        self,
        model: Model,
        body: bytes,
        json_output: bool,
        end: float,
        request_id: str | None,
        run: Tab,
    ) -> tuple[Parsed, int]:
        last: Failure | None = None
        while True:
            ticket = self._gate(model)
            if ticket is None:
                if await self._probe_passed(model, end, run):
                    continue
                raise self._circuit_open(model, last, run.calls, run)
            calls = run.calls
            result = await self._attempt(model, ticket, body, json_output, end, run)
            attempt = run.calls
            if attempt == calls and isinstance(result, Failure):
                raise self._unsent(model, result, last, run)
            self._log_attempt(model, result, request_id, attempt)
            if isinstance(result, Parsed):
                return result, attempt
            last = result
            self._refusals.heard(model, result, self._clock.monotonic())
            wait = self._next_wait(result, attempt, end)
            if wait is None:
                # Said only when the wait asked for is what stopped it (not the retry cap).
                waited_out = result.wait_s and self._may_retry(result, attempt)
                note = "the provider asked to wait past the deadline" if waited_out else ""
                raise self._error(model, result, attempt, run, note=note)
            if self._observer:
                self._observer.on_retry(self.provider, model.id, result.error_type)
            with self._waits.bounded(run, None):
                await anyio.sleep(wait)

    def _unsent(
        self, model: Model, refusal: Failure, last: Failure | None, run: Tab
    ) -> ProviderError:
        """Refused a slot (no time left, or a pause past the deadline): nothing was sent.
        The provider's last answer, when there was one, says more than the refusal."""
        if last is None:
            return self._error(model, refusal, run.calls, run)
        return self._error(model, last, run.calls, run, note=f"not retried: {refusal.message}")

    def _circuit_open(
        self, model: Model, last: Failure | None, attempts: int, run: Tab
    ) -> ProviderError:
        if last is not None:
            # It was called, and failed: the failure says more than the breaker does.
            return self._error(model, last, attempts, run, note="circuit opened; not retried")
        return CircuitOpenError(
            f"{self.provider} {model.api_model}: circuit open, not called",
            provider=self.provider,
            model=model.api_model,
            error_type="circuit_open",
            attempts=0,
            cost_usd=run.failed_usd(model.price is not None),  # 0: not called, not billed
        )

    def _next_wait(self, failure: Failure, attempt: int, end: float) -> float | None:
        """Seconds before the next attempt, or None when the loop must stop now."""
        if not self._may_retry(failure, attempt):
            return None
        wait = failure.wait_s
        if wait is None:
            wait = self._backoff.delay(attempt, self._rng)
        # Sleeping into the deadline would only buy an attempt with no time to run.
        return wait if self._clock.monotonic() + wait < end else None

    def _may_retry(self, failure: Failure, attempt: int) -> bool:
        return failure.retryable and attempt <= self.settings.max_retries

    async def _probe_passed(self, model: Model, end: float, run: Tab) -> bool:
        """Half-open: wait (within the budget) for the probe's verdict instead of failing.

        After an outage the first call is a probe and the rest would fail at once; a burst
        (a re-drive, a backlog) would then dead-letter wholesale just as the provider came
        back. Open (still cooling down) still fails fast, which is what the fallback needs.
        """
        state = self._state(model)
        if state.breaker.state(self._clock.monotonic()) != "half_open":
            return False
        verdict = state.verdict
        with self._waits.bounded(run, end - self._clock.monotonic()):
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
            initial = model.initial_concurrency or self.settings.initial_concurrency
            limiter = AdaptiveLimiter(
                self.settings.max_connections, initial=initial, clock=self._clock.monotonic
            )
            state = self._models[model.id] = _ModelState(
                breaker=CircuitBreaker(self._breaker_config), limiter=limiter
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
        run: Tab,
    ) -> Parsed | Failure:
        """One call (counted in `run.calls` once it goes out); the breaker and the limiter
        hear its outcome whatever happens."""
        state = self._state(model)
        permit: Permit | None = None
        outcome: Outcome = "neutral"
        throttled = False
        try:
            acquired = await acquire(state.limiter, end, self._clock.monotonic, self._waits, run)
            if isinstance(acquired, Failure):
                return acquired
            permit = acquired
            run.calls += 1
            run.sending = True
            exchange = await self._http.send(body, json_output, end)
            run.sending = False
            outcome, throttled = judge(exchange.result)
        finally:
            self._settle(model, state, ticket, permit, outcome, throttled)
        heed(state.limiter, exchange)
        self._account(model, exchange, run)
        if self._observer:
            self._observer.on_attempt(self.provider, model.id, exchange.label, exchange.seconds)
        return exchange.result

    def _account(self, model: Model, exchange: Exchange, run: Tab) -> None:
        """What the provider billed for this attempt: a 200, usable or not."""
        result = exchange.result
        if isinstance(result, Parsed):
            usage, finish, run.request_id = result.usage, result.finish_reason, result.response_id
        else:
            usage, finish, run.request_id = result.usage, result.finish_reason, result.request_id
            if result.status != 200:
                return
            if usage is None and result.error_type == "malformed_response":
                # Not a completion at all (a gateway's page, a cut body) and no usage:
                # taken as not billed.
                if self._observer:
                    self._observer.on_answer(self.provider, model.id, finish, None, None)
                return
        run.answered += 1
        billed = charge(model, usage)
        if billed.cost_usd is not None:
            run.cost_usd = (run.cost_usd or 0.0) + billed.cost_usd
        elif model.price is not None:
            run.unpriced += 1
        if billed.problem is not None:
            self._usage.warn(model, billed.problem, usage, billed.cost_usd)
            if self._observer:
                self._observer.on_usage_problem(self.provider, model.id, billed.problem)
        if self._observer:
            self._observer.on_answer(self.provider, model.id, finish, billed.usage, billed.cost_usd)

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

    def _log_attempt(
        self, model: Model, result: Parsed | Failure, request_id: str | None, attempt: int
    ) -> None:
        what = "ok" if isinstance(result, Parsed) else result.error_type
        logger.debug(
            "attempt %d on %s %s: %s",
            attempt,
            self.provider,
            model.api_model,
            what,
            extra={"request_id": request_id},
        )

    def _error(
        self, model: Model, failure: Failure, attempts: int, run: Tab, *, note: str = ""
    ) -> ProviderError:
        kind = RetryableProviderError if failure.retryable else FatalProviderError
        status = f"HTTP {failure.status}" if failure.status else failure.error_type
        text = f"{self.provider} {model.api_model}: {status}: {failure.message}"
        if attempts:
            text += f" (after {attempts} attempt{'s' if attempts != 1 else ''})"
        else:
            text += " (not called)"
        if note:
            text += f"; {note}"
        return kind(
            self._http.scrub(text),
            provider=self.provider,
            model=model.api_model,
            status=failure.status,
            error_type=failure.error_type,
            attempts=attempts,
            provider_request_id=failure.request_id or run.request_id,
            cost_usd=run.failed_usd(model.price is not None),
        )
