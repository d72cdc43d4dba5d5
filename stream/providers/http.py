"""The HTTP half of a provider call: send one chat completion body, read what came back.

    send ─► transport: Answer ─► _read: Parsed | Failure

The bytes move through `stream.providers.transport.AiohttpTransport` (our httpx transport
over aiohttp): its `post` skips httpx's per-request objects. Any other httpx transport
given (tests hand in an `httpx.MockTransport`) is spoken to as httpx does, through an
`httpx.Request`, under an anyio deadline. The API key is revealed once, into the default
`Authorization` header, and is scrubbed from any provider text that ends up in an exception
or a log line.

Nothing here retries, waits or keeps state between calls: that is `ProviderClient`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

import aiohttp
import anyio
import httpx
import orjson
from yarl import URL

from stream.config import ProviderSettings
from stream.providers.clock import Clock
from stream.providers.completion import BadOutput, Parsed, Usage, parse_completion
from stream.providers.retry import classify, retry_after, status_class
from stream.providers.transport import (
    MAX_ANSWER_BYTES,
    AiohttpTransport,
    Answer,
    AnswerCut,
    AnswerTooLarge,
)

__all__ = ["Exchange", "Failure", "ProviderHTTP"]

_MAX_MESSAGE = 300
_REDACTED = "[redacted]"
_MIN_SECRET = 8  # characters
_MAX_REQUEST_ID = 200  # as long as the body's id may be (`completion._text`)
# Statuses that mean "too many calls": the limiter shrinks on them.
_THROTTLES = frozenset({429, 503, 529})


@dataclass(frozen=True, kw_only=True, slots=True)
class Failure:
    """One failed attempt, before it is known whether the loop tries again."""

    retryable: bool
    error_type: str
    message: str
    status: int | None = None
    wait_s: float | None = None  # what the provider asked for (Retry-After)
    request_id: str | None = None  # the provider's, to quote to its support
    usage: Usage | None = None  # what it billed for this attempt (a bad 200), if it said
    finish_reason: str | None = None  # how that bad 200 said it ended, if it said
    # What the breaker and the limiter hear (`attempts.judge`), decided where the answer is
    # read. A failure before any call (no slot, no time) is never judged.
    provider_fault: bool = False
    throttled: bool = False


class Exchange(NamedTuple):
    """One attempt as the wire saw it: its reading, a metrics label, its duration, and
    the response headers, case-insensitive (None when no response came)."""

    result: Parsed | Failure
    label: str
    seconds: float
    headers: Mapping[str, str] | None


class ProviderHTTP:
    """One provider's connection pool and the POST of a chat completion."""

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock or Clock()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key.reveal()}"
        self._transport = transport or AiohttpTransport(
            max_connections=settings.max_connections,
            connect_timeout_s=settings.connect_timeout_s,
            headers=headers,
        )
        # Parsed once: a URL string is parsed again on every request.
        url = settings.base_url.rstrip("/") + "/chat/completions"
        self._url = URL(url)
        # What another transport is handed, built once (httpx masks the key in reprs).
        self._httpx_url = httpx.URL(url)
        self._httpx_headers = httpx.Headers({**headers, "Host": self._httpx_url.netloc.decode()})

    async def open(self) -> None:
        """Make the connection pool before the first call needs it."""
        if isinstance(self._transport, AiohttpTransport):
            await self._transport.open()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def send(self, body: bytes, json_output: bool, end: float) -> Exchange:
        """POST `body` and read the answer, giving up at `end` (monotonic)."""
        now = self._clock.monotonic
        start = now()
        timeout_s = min(self.settings.timeout_s, end - start)
        transport = self._transport
        try:
            # Our transport directly (no helper coroutine: a frame per call in flight).
            if isinstance(transport, AiohttpTransport):
                answer = await transport.post(self._url, body, timeout_s)
            else:
                with anyio.fail_after(timeout_s):
                    answer = await self._via_httpx(transport, body)
        except AnswerTooLarge as exc:
            label = status_class(exc.status)
            too_large = _too_large(exc, self._request_id(exc.headers))
            return Exchange(too_large, label, now() - start, exc.headers)
        except AnswerCut as exc:
            label = status_class(exc.status)
            return Exchange(self._cut(exc, json_output), label, now() - start, exc.headers)
        except (aiohttp.ClientError, httpx.RequestError) as exc:
            # First: aiohttp's connect timeout is a TimeoutError too, but no answer was late.
            label = "timeout" if isinstance(exc, aiohttp.SocketTimeoutError) else "connect"
            return Exchange(_lost(f"{label}_error", describe(exc)), label, now() - start, None)
        except TimeoutError:
            return Exchange(_lost("timeout", "no answer in time"), "timeout", now() - start, None)
        except OSError as exc:
            return Exchange(_lost("connect_error", describe(exc)), "connect", now() - start, None)
        result = self._read(answer, json_output)
        return Exchange(result, status_class(answer.status), now() - start, answer.headers)

    async def _via_httpx(self, transport: httpx.AsyncBaseTransport, body: bytes) -> Answer:
        headers = self._httpx_headers.copy()
        headers["Content-Length"] = str(len(body))
        request = httpx.Request("POST", self._httpx_url, headers=headers, content=body)
        response = await transport.handle_async_request(request)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise AnswerTooLarge(response.status_code, response.headers, MAX_ANSWER_BYTES)
                chunks.append(chunk)
        finally:
            await response.aclose()
        content = b"".join(chunks)
        return Answer(response.status_code, response.reason_phrase, response.headers, content)

    def _read(self, answer: Answer, json_output: bool) -> Parsed | Failure:
        status, headers = answer.status, answer.headers
        request_id = self._request_id(headers)
        if status == 200:
            try:
                parsed = parse_completion(answer.body, json_output=json_output)
            except BadOutput as exc:
                return Failure(
                    retryable=exc.retryable,
                    error_type=exc.error_type,
                    message=str(exc),
                    status=200,
                    request_id=request_id,
                    usage=exc.usage,
                    finish_reason=exc.finish_reason,
                    provider_fault=exc.provider_fault,
                )
            if parsed.response_id is None and request_id:
                parsed = replace(parsed, response_id=request_id)
            return self._scrubbed(parsed)
        if 200 < status < 300:
            # Not held against the provider's health, as `classify` has any 2xx.
            return Failure(
                retryable=True,
                error_type="unexpected_status",
                message="no completion in the answer",
                status=status,
                request_id=request_id,
            )
        # Scrubbed before any cut: a long key cut in half by truncation would not match later.
        code, message = error_detail(answer.body.decode("utf-8", "replace"), self.scrub)
        verdict = classify(status, headers, code, message)
        return Failure(
            retryable=verdict.retryable,
            error_type=verdict.error_type,
            message=message or answer.reason or f"HTTP {status}",
            status=status,
            wait_s=retry_after(headers, self._clock.wall()),
            request_id=request_id,
            provider_fault=verdict.provider_fault,
            # An exhausted quota is not a pace to slow down to.
            throttled=status in _THROTTLES and verdict.error_type != "insufficient_quota",
        )

    def _cut(self, exc: AnswerCut, json_output: bool) -> Parsed | Failure:
        """An answer whose body stopped short. A 200 was answered, so likely billed: what
        for cannot be read, so it is charged like an answer without usage (the spend window
        takes the call's estimate), and tried again (a broken connection is seldom the
        provider's habit). Any other status is judged by its status and headers alone."""
        if exc.status != 200:
            return self._read(Answer(exc.status, "", exc.headers, b""), json_output)
        return Failure(
            retryable=True,
            error_type="answer_cut",
            message=f"the answer was cut off: {self.scrub(describe(exc.__cause__ or exc))}"[
                :_MAX_MESSAGE
            ],
            status=200,
            request_id=self._request_id(exc.headers),
            provider_fault=True,
        )

    def scrub(self, text: str) -> str:
        # Some providers echo the key back in an auth error; it must not travel further.
        key = self._secret()
        return text.replace(key, _REDACTED) if key else text

    def _secret(self) -> str:
        """The key, if it is one worth looking for: a real one is tens of characters; a
        test's "k" would take every k out of every text."""
        key = self.settings.api_key.reveal()
        return key if len(key) >= _MIN_SECRET else ""

    def _request_id(self, headers: Mapping[str, str]) -> str | None:
        """The provider's `x-request-id`, scrubbed, then cut (it is copied into records and
        errors, whatever the path)."""
        return self.scrub(headers.get("x-request-id", ""))[:_MAX_REQUEST_ID] or None

    def _scrubbed(self, parsed: Parsed) -> Parsed:
        """The answer without the key in any text it carries into a record: a provider (or
        a proxy) that echoes it, in the answer, its id, the model's name or the usage's
        field names, must not publish it. A look for the key in each text; a copy only
        when one has it."""
        key = self._secret()
        if not key:
            return parsed
        found: dict[str, object] = {}
        for name in ("content", "reasoning", "served_model", "finish_reason", "response_id"):
            value = getattr(parsed, name)
            if value is not None and key in value:
                found[name] = value.replace(key, _REDACTED)
        key_bytes = key.encode()
        for name in ("tool_calls", "usage"):  # a usage's field names are the provider's too
            value = getattr(parsed, name)
            if value is not None and key_bytes in (text := orjson.dumps(value)):
                found[name] = orjson.loads(text.replace(key_bytes, _REDACTED.encode()))
        return replace(parsed, **found) if found else parsed  # type: ignore[arg-type]


def _too_large(exc: AnswerTooLarge, request_id: str | None) -> Failure:
    """An answer past any real one (a gzip bomb, an endless body). Not retried: a provider
    that answered so once will likely again, and it may have billed the call (what for
    cannot be read). Held against its health; the request goes to its fallback."""
    return Failure(
        retryable=False,
        error_type="answer_too_large",
        message=str(exc),
        status=exc.status,
        request_id=request_id,
        provider_fault=True,
    )


def _lost(error_type: str, message: str) -> Failure:
    """No answer came (refused, reset, late): the provider's trouble, worth another try."""
    return Failure(retryable=True, error_type=error_type, message=message, provider_fault=True)


def describe(exc: BaseException) -> str:
    detail = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {detail}"[:_MAX_MESSAGE]


def error_detail(body: str, scrub: Callable[[str], str]) -> tuple[str | None, str]:
    """(error code or type, message) from an OpenAI-style error body, tolerant of junk.

    Text is scrubbed of the key before any cut, and after JSON decoding too: a key the
    body escapes (`\\u0073k-…`) is only itself once decoded."""
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
