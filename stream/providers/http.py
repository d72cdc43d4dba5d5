"""The HTTP half of a provider call: send one chat completion body, read what came back.

    send ─► _post (straight to the transport) ─► _read: Parsed | Failure

`httpx.AsyncClient` runs on the aiohttp transport: the stock httpcore pool collapses at
hundreds of connections (see DESIGN.md), the aiohttp one does not. The API key is revealed
once, into the client's default `Authorization` header (httpx masks it in reprs), and is
scrubbed from any provider text that ends up in an exception or a log line.

Nothing here retries, waits or keeps state between calls: that is `ProviderClient`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import aiohttp
import anyio
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from stream.config import ProviderSettings
from stream.providers.clock import Clock
from stream.providers.completion import BadOutput, Parsed, Usage, parse_completion
from stream.providers.retry import classify, retry_after, status_class

__all__ = ["Exchange", "Failure", "ProviderHTTP"]

_MAX_MESSAGE = 300


@dataclass(frozen=True, kw_only=True)
class Failure:
    """One failed attempt, before it is known whether the loop tries again."""

    retryable: bool
    error_type: str
    message: str
    status: int | None = None
    wait_s: float | None = None  # what the provider asked for (Retry-After)
    request_id: str | None = None  # the provider's, to quote to its support
    usage: Usage | None = None  # what it billed for this attempt (a bad 200), if it said


class Exchange(NamedTuple):
    """One attempt as the wire saw it: its reading, a metrics label, its duration, and
    the response headers (None when no response came)."""

    result: Parsed | Failure
    label: str
    seconds: float
    headers: httpx.Headers | None


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

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, body: bytes, json_output: bool, end: float) -> Exchange:
        """POST `body` and read the answer, giving up at `end` (monotonic)."""
        now = self._clock.monotonic
        start = now()
        try:
            with anyio.fail_after(min(self.settings.timeout_s, end - start)):
                response = await self._post(body)
        except TimeoutError:
            failure = Failure(retryable=True, error_type="timeout", message="no answer in time")
            return Exchange(failure, "timeout", now() - start, None)
        except (httpx.RequestError, aiohttp.ClientError, OSError) as exc:
            # httpx-aiohttp translates only some aiohttp errors: a bad status line or
            # header (ClientResponseError) or an undecodable body arrive as they are.
            label = "timeout" if isinstance(exc, httpx.ReadTimeout) else "connect"
            failure = Failure(retryable=True, error_type=f"{label}_error", message=describe(exc))
            return Exchange(failure, label, now() - start, None)
        result = self._read(response, json_output)
        return Exchange(result, status_class(response.status_code), now() - start, response.headers)

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

    def _read(self, response: httpx.Response, json_output: bool) -> Parsed | Failure:
        request_id = response.headers.get("x-request-id") or None
        if response.status_code == 200:
            try:
                parsed = parse_completion(response.content, json_output=json_output)
            except BadOutput as exc:
                return Failure(
                    retryable=exc.retryable,
                    error_type=exc.error_type,
                    message=str(exc),
                    status=200,
                    request_id=request_id,
                    usage=exc.usage,
                )
            if parsed.response_id is None and request_id:
                parsed = replace(parsed, response_id=request_id[:200])
            return parsed
        if 200 < response.status_code < 300:
            return Failure(
                retryable=True,
                error_type="unexpected_status",
                message="no completion in the answer",
                status=response.status_code,
                request_id=request_id,
            )
        # Scrubbed before any cut: a long key cut in half by truncation would not match later.
        body = response.content.decode("utf-8", "replace")
        code, message = error_detail(body, self.scrub)
        verdict = classify(response.status_code, response.headers, code, message)
        return Failure(
            retryable=verdict.retryable,
            error_type=verdict.error_type,
            message=message or response.reason_phrase or f"HTTP {response.status_code}",
            status=response.status_code,
            wait_s=retry_after(response.headers, self._clock.wall()),
            request_id=request_id[:200] if request_id else None,
        )

    def scrub(self, text: str) -> str:
        # Some providers echo the key back in an auth error; it must not travel further.
        key = self.settings.api_key.reveal()
        return text.replace(key, "[redacted]") if key else text


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
