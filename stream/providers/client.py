"""The OpenAI-compatible client for one provider: one call, retried inside its deadline.

    complete ─► breaker gate ─► _retry_loop ─► _attempt ─► limiter ─► _send (httpx)
                                     ▲              └─► _read: Parsed | _Failure
                                     └── wait: Retry-After, else backoff; never past the end

`httpx.AsyncClient` runs on the aiohttp transport: the stock httpcore pool collapses at
hundreds of connections (see DESIGN.md), the aiohttp one does not. The API key is revealed
once, into the client's default `Authorization` header (httpx masks it in reprs), and is
scrubbed from any provider text that ends up in an exception or a log line.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import aiohttp
import anyio
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from stream.catalog import Model
from stream.config import ProviderSettings
from stream.errors import (
    CircuitOpenError,
    FatalProviderError,
    ProviderError,
    RetryableProviderError,
)
from stream.providers.breaker import BreakerConfig, CircuitBreaker, Outcome, Ticket
from stream.providers.completion import BadOutput, Completion, Parsed, parse_completion, wants_json
from stream.providers.limiter import AdaptiveLimiter, Permit, ratelimit_pause
from stream.providers.retry import Backoff, classify, retry_after, status_class

__all__ = ["ProviderClient", "ProviderObserver"]

logger = logging.getLogger(__name__)

# Statuses that mean "too many calls": the limiter shrinks on them.
_THROTTLES = frozenset({429, 503, 529})
_MAX_MESSAGE = 300


class ProviderObserver(Protocol):
    """Where the client reports what it does (the metrics module implements it)."""

    def on_attempt(self, provider: str, model: str, status_class: str, seconds: float) -> None: ...

    def on_retry(self, provider: str, model: str, error_type: str) -> None: ...

    def on_breaker(self, provider: str, model: str, state: str) -> None: ...


@dataclass(frozen=True, kw_only=True)
class _Failure:
    """One failed attempt, before it is known whether the loop tries again."""

    retryable: bool
    error_type: str
    message: str
    status: int | None = None
    wait_s: float | None = None  # what the provider asked for (Retry-After)


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
    ) -> None:
        self.settings = settings
        self.provider = settings.name
        self._observer = observer
        self._breaker_config = breaker or BreakerConfig(cooldown_s=settings.breaker_cooldown_s)
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._verdicts: dict[str, anyio.Event] = {}  # set when a half-open probe decides
        self._reported: dict[str, str] = {}
        # One limiter per model, not per provider: a model that is down answers 503 for
        # itself, and must not shrink the concurrency of the provider's healthy models.
        self._limiters: dict[str, AdaptiveLimiter] = {}
        self._transport = transport or self._aiohttp_transport(settings)
        self._http = self._http_client(settings, self._transport)
        # Parsed once: merging a relative path into base_url re-parses a URL per request.
        self._url = httpx.URL(settings.base_url.rstrip("/") + "/chat/completions")
        # What `_post` sends with every request, merged once: the client's defaults, ours,
        # and the Host that httpx would otherwise work out again for each request.
        host = ("Host", self._url.netloc.decode("ascii"))
        self._headers = httpx.Headers([*self._http.headers.multi_items(), host])
        self._extensions = {"timeout": self._http.timeout.as_dict()}

    @staticmethod
    def _aiohttp_transport(settings: ProviderSettings) -> httpx.AsyncBaseTransport:
        size = settings.max_connections
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        return AiohttpTransport(limits=limits)

    @staticmethod
    def _http_client(
        settings: ProviderSettings, transport: httpx.AsyncBaseTransport
    ) -> httpx.AsyncClient:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key.reveal()}"
        return httpx.AsyncClient(
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            follow_redirects=False,
        )

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
        limits = {model: round(limiter.limit) for model, limiter in self._limiters.items()}
        return f"ProviderClient({self.provider} {self.settings.base_url}, limits={limits})"

    def limiter(self, model: Model) -> AdaptiveLimiter:
        """The adaptive concurrency limit of one model at this provider."""
        limiter = self._limiters.get(model.id)
        if limiter is None:
            limiter = self._limiters[model.id] = AdaptiveLimiter(self.settings.max_connections)
        return limiter

    def breaker_state(self, model: Model) -> str:
        state = self._breaker(model).state(time.monotonic())
        self._observe(model, state)
        return state

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
        started = time.monotonic()
        end = started + self._budget(model, deadline)
        if end <= started:
            failure = _Failure(retryable=True, error_type="deadline", message="deadline passed")
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
            latency_ms=(time.monotonic() - started) * 1000.0,
        )

    @staticmethod
    def _budget(model: Model, deadline: float | None) -> float:
        budget = model.timeout_s
        if deadline is not None:
            budget = min(budget, deadline - time.time())
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
        last: _Failure | None = None
        while True:
            ticket = self._gate(model, time.monotonic())
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

    def _circuit_open(self, model: Model, last: _Failure | None, attempts: int) -> ProviderError:
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

    def _next_wait(self, failure: _Failure, attempt: int, end: float) -> float | None:
        """Seconds before the next attempt, or None when the loop must stop now."""
        if not failure.retryable or attempt > self.settings.max_retries:
            return None
        wait = failure.wait_s
        if wait is None:
            wait = self._backoff.delay(attempt, self._rng)
        # Sleeping into the deadline would only buy an attempt with no time to run.
        return wait if time.monotonic() + wait < end else None

    async def _probe_passed(self, model: Model, end: float) -> bool:
        """Half-open: wait (within the budget) for the probe's verdict instead of failing.

        After an outage the first call is a probe and the rest would fail at once; a burst
        (a re-drive, a backlog) would then dead-letter wholesale just as the provider came
        back. Open (still cooling down) still fails fast, which is what the fallback needs.
        """
        if self._breaker(model).state(time.monotonic()) != "half_open":
            return False
        verdict = self._verdicts.setdefault(model.id, anyio.Event())
        with anyio.move_on_after(end - time.monotonic()):
            await verdict.wait()
        return verdict.is_set()

    def _gate(self, model: Model, now: float) -> Ticket | None:
        breaker = self._breaker(model)
        self._observe(model, breaker.state(now))  # open → half_open happens on reading
        return breaker.allow(now)

    def _breaker(self, model: Model) -> CircuitBreaker:
        breaker = self._breakers.get(model.id)
        if breaker is None:
            breaker = self._breakers[model.id] = CircuitBreaker(self._breaker_config)
        return breaker

    def _observe(self, model: Model, state: str) -> None:
        """Report each breaker state change once, whoever noticed it first."""
        before = self._reported.get(model.id, "closed")
        if before == state:
            return
        self._reported[model.id] = state
        logger.warning("circuit %s → %s for %s %s", before, state, self.provider, model.api_model)
        if self._observer:
            self._observer.on_breaker(self.provider, model.id, state)

    async def _attempt(
        self,
        model: Model,
        ticket: Ticket,
        body: bytes,
        json_output: bool,
        end: float,
        request_id: str | None,
        attempt: int,
    ) -> Parsed | _Failure:
        """One call; the breaker and the limiter hear its outcome whatever happens."""
        permit: Permit | None = None
        outcome: Outcome = "neutral"
        throttled = False
        try:
            permit = await self._acquire(self.limiter(model), end)
            if permit is None:
                return _Failure(retryable=True, error_type="deadline", message="no slot in time")
            result, label, seconds = await self._timed_send(model, body, json_output, end)
            outcome, throttled = self._judge(result)
        finally:
            self._settle(model, ticket, permit, outcome, throttled)
        self._note_attempt(model, result, label, seconds, request_id, attempt)
        return result

    @staticmethod
    async def _acquire(limiter: AdaptiveLimiter, end: float) -> Permit | None:
        permit = limiter.try_acquire()
        if permit is not None:
            return permit
        try:
            with anyio.fail_after(end - time.monotonic()):
                return await limiter.acquire()
        except TimeoutError:
            return None

    async def _timed_send(
        self, model: Model, body: bytes, json_output: bool, end: float
    ) -> tuple[Parsed | _Failure, str, float]:
        start = time.monotonic()
        try:
            with anyio.fail_after(min(self.settings.timeout_s, end - start)):
                response = await self._post(body)
        except TimeoutError:
            failure = _Failure(retryable=True, error_type="timeout", message="no answer in time")
            return failure, "timeout", time.monotonic() - start
        except (httpx.RequestError, aiohttp.ClientError, OSError) as exc:
            # httpx-aiohttp translates only some aiohttp errors: a bad status line or
            # header (ClientResponseError) or an undecodable body arrive as they are.
            label = "timeout" if isinstance(exc, httpx.ReadTimeout) else "connect"
            failure = _Failure(retryable=True, error_type=f"{label}_error", message=_describe(exc))
            return failure, label, time.monotonic() - start
        return (
            self._read(model, response, json_output),
            status_class(response.status_code),
            (time.monotonic() - start),
        )

    async def _post(self, body: bytes) -> httpx.Response:
        """POST straight to the client's transport. `AsyncClient.send` adds, per request,
        header merging, auth and redirect machinery and cookie extraction (a fifth of a
        worker's CPU at full speed), and none of it applies to a bearer-key API call."""
        headers = self._headers.copy()
        headers["Content-Length"] = str(len(body))
        # A ready stream and complete headers: httpx then skips re-deriving them (5x faster).
        request = httpx.Request(
            "POST",
            self._url,
            headers=headers,
            stream=httpx.ByteStream(body),
            extensions=self._extensions,
        )
        request.read()  # marks the body as in memory, so the transport sends it in one piece
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    def _read(self, model: Model, response: httpx.Response, json_output: bool) -> Parsed | _Failure:
        # Quota headers ride on successes too: the last call before the wall is a 200.
        pause = ratelimit_pause(response.headers)
        if pause:
            self.limiter(model).pause(pause)
        if response.status_code == 200:
            try:
                return parse_completion(response.content, json_output=json_output)
            except BadOutput as exc:
                return _Failure(
                    retryable=True, error_type=exc.error_type, message=str(exc), status=200
                )
        if 200 < response.status_code < 300:
            return _Failure(
                retryable=True,
                error_type="unexpected_status",
                message="no completion in the answer",
                status=response.status_code,
            )
        # Scrubbed before any cut: a long key cut in half by truncation would not match later.
        body = response.content.decode("utf-8", "replace")
        code, message = _error_detail(body, self._scrub)
        verdict = classify(response.status_code, response.headers, code)
        return _Failure(
            retryable=verdict.retryable,
            error_type=verdict.error_type,
            message=message or response.reason_phrase or f"HTTP {response.status_code}",
            status=response.status_code,
            wait_s=retry_after(response.headers, time.time()),
        )

    @staticmethod
    def _judge(result: Parsed | _Failure) -> tuple[Outcome, bool]:
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
        ticket: Ticket,
        permit: Permit | None,
        outcome: Outcome,
        throttled: bool,
    ) -> None:
        if permit is not None:
            self.limiter(model).release(permit, throttled=throttled, success=outcome == "success")
        breaker = self._breaker(model)
        self._observe(model, breaker.record(outcome, time.monotonic(), ticket))
        if ticket.probe:
            # A probe finished: wake the calls waiting on it; they gate again (closed: go,
            # open: fail fast, still half-open: one of them probes next).
            self._verdicts.pop(model.id, anyio.Event()).set()

    def _note_attempt(
        self,
        model: Model,
        result: Parsed | _Failure,
        label: str,
        seconds: float,
        request_id: str | None,
        attempt: int,
    ) -> None:
        if self._observer:
            self._observer.on_attempt(self.provider, model.id, label, seconds)
        what = "ok" if isinstance(result, Parsed) else result.error_type
        logger.debug(
            "attempt %d on %s %s: %s (%s) in %.3fs",
            attempt,
            self.provider,
            model.api_model,
            what,
            label,
            seconds,
            extra={"request_id": request_id},
        )

    def _error(
        self, model: Model, failure: _Failure, attempts: int, *, note: str = ""
    ) -> ProviderError:
        kind = RetryableProviderError if failure.retryable else FatalProviderError
        status = f"HTTP {failure.status}" if failure.status else failure.error_type
        text = f"{self.provider} {model.api_model}: {status}: {failure.message}"
        text += f" (after {attempts} attempt{'s' if attempts != 1 else ''})"
        if note:
            text += f"; {note}"
        return kind(
            self._scrub(text),
            provider=self.provider,
            model=model.api_model,
            status=failure.status,
            error_type=failure.error_type,
            attempts=attempts,
        )

    def _scrub(self, text: str) -> str:
        # Some providers echo the key back in an auth error; it must not travel further.
        key = self.settings.api_key.reveal()
        return text.replace(key, "[redacted]") if key else text


def _describe(exc: BaseException) -> str:
    detail = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {detail}"[:_MAX_MESSAGE]


def _error_detail(body: str, scrub: Callable[[str], str]) -> tuple[str | None, str]:
    """(error code or type, message) from an OpenAI-style error body, tolerant of junk.

    Text is scrubbed of the key before any cut, and after JSON decoding too: a key the
    body escapes (`\u0073k-…`) is only itself once decoded."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None, scrub(body)[:_MAX_MESSAGE].strip()
    if not isinstance(error, dict):
        return None, scrub(str(error))[:_MAX_MESSAGE] if error else ""
    kinds = (error.get("code"), error.get("type"))
    # Quota exhaustion hides in either field depending on the provider.
    code = "insufficient_quota" if "insufficient_quota" in kinds else (kinds[0] or kinds[1])
    message = scrub(str(error.get("message") or ""))[:_MAX_MESSAGE]
    return (str(code) if code else None), message
