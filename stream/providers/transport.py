"""One provider's connection pool: an httpx transport of our own over an aiohttp session.

    ProviderHTTP.send ─► AiohttpTransport.post ─► aiohttp: pool, POST, read ─► Answer

httpx stays the client's API: `AiohttpTransport` is an `httpx.AsyncBaseTransport`, so an
`httpx.AsyncClient` can use it, and a `ProviderClient` takes any httpx transport (tests
hand it an `httpx.MockTransport`). But a chat completion does not go through httpx's
objects: `post` sends the body with the session's default headers (the key, the content
type, merged once) to a URL parsed once, under one aiohttp deadline for the whole call,
and returns the status, the headers aiohttp parsed and the body. Per call that skips an
`httpx.Request`, an `httpx.Response` with its header list re-encoded and re-decoded, a
response stream iterated chunk by chunk, and an anyio cancel scope: the provider client
then costs about what bare aiohttp does (`bench/client_bench.py`).

The stock httpx pool (httpcore) is not an option: its bookkeeping is quadratic in
connections (DESIGN.md, "Calling providers").

An answer is read in chunks, decompressed as it comes (aiohttp inflates a gzip body a
bounded piece at a time), and never past `MAX_ANSWER_BYTES`: a provider that sends a
gzip bomb or an endless body costs one bounded buffer, not the worker.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import NamedTuple

import aiohttp
import anyio
import httpx
from aiohttp import hdrs
from yarl import URL

from stream.errors import ConfigError

__all__ = ["MAX_ANSWER_BYTES", "AiohttpTransport", "Answer", "AnswerCut", "AnswerTooLarge"]

# How long an idle pooled connection is kept: httpx's default, which providers' load
# balancers outlive.
_KEEPALIVE_S = 5.0

# The largest answer body read, decompressed. No answer of the catalog's models comes near
# it: the longest context (Kimi K2 Thinking, 262,144 tokens) bounds a completion, and even
# at 12 bytes a token (JSON-escaped CJK or emoji) that is 3 MiB; the results topic takes
# 1 MiB anyway (a larger answer becomes a `result_too_large` dead letter, paid and kept).
MAX_ANSWER_BYTES = 8 * 1024 * 1024


class Answer(NamedTuple):
    """An HTTP answer as read off the wire."""

    status: int
    reason: str
    headers: Mapping[str, str]  # case-insensitive
    body: bytes


class AnswerTooLarge(Exception):
    """The answer's body (decompressed) runs past the limit: it was not read further."""

    def __init__(self, status: int, headers: Mapping[str, str], limit: int) -> None:
        super().__init__(f"the answer is over {limit:,} bytes; not read further")
        self.status = status
        self.headers = headers


class AnswerCut(Exception):
    """The status line and headers came, the body did not whole: the connection broke,
    the deadline passed, or it did not decompress. A 200 cut so was likely billed."""

    def __init__(self, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"HTTP {status}: the answer stopped short")  # its cause: __cause__
        self.status = status
        self.headers = headers


class AiohttpTransport(httpx.AsyncBaseTransport):
    """A pool of up to `max_connections` to one provider, with its default headers."""

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout_s: float,
        headers: Mapping[str, str] | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._limit = max_connections
        self._max_answer = max_answer_bytes
        self._connect_timeout_s = connect_timeout_s
        self._headers = dict(headers or {})
        # Made on first use: an aiohttp session belongs to the event loop it starts in.
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Make the pool now, in this event loop, rather than on the first call: reading
        the certificates takes ~30 ms (in a thread here), which a first wave of calls
        after a start would otherwise wait for."""
        if self._session is None:
            try:
                context = await anyio.to_thread.run_sync(httpx.create_ssl_context)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load the CA certificates to verify the providers ({exc}): fix "
                    "or unset SSL_CERT_FILE / SSL_CERT_DIR"
                ) from None
            if self._session is None:  # a call made it meanwhile
                self._open(context)

    def _open(self, context: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
        # Certificates as httpx verifies them (certifi, or SSL_CERT_FILE / SSL_CERT_DIR).
        if context is None:
            context = httpx.create_ssl_context()
        connector = aiohttp.TCPConnector(
            limit=self._limit, keepalive_timeout=_KEEPALIVE_S, ssl=context
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            # No cookies (an API call), no proxies or .netrc from the environment.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=True,
        )
        return self._session

    async def post(self, url: URL, body: bytes, timeout_s: float) -> Answer:
        """POST `body` with the default headers; the whole call (a pool slot, the
        connection, the answer read to its end) within `timeout_s`.

        Raises aiohttp's `ClientError` for what goes wrong on the wire (a connection not
        made within the connect timeout is `ConnectionTimeoutError`: a `ClientError`, and a
        `TimeoutError` too), a plain `TimeoutError` when `timeout_s` runs out, and
        `AnswerTooLarge` for a body past the limit, `AnswerCut` for one that stops short
        (the status and headers came: a 200 was answered, and likely billed).
        """
        session = self._session or self._open()
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._connect_timeout_s)
        async with session.post(url, data=body, timeout=timeout, allow_redirects=False) as response:
            try:
                content = await self._read(response)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise AnswerCut(response.status, response.headers) from exc
        return Answer(response.status, response.reason or "", response.headers, content)

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self._max_answer
        length = response.content_length
        if length is not None and hdrs.CONTENT_ENCODING not in response.headers:
            if length <= limit:
                return await response.read()  # the common case: as long as it says
            response.close()
            raise AnswerTooLarge(response.status, response.headers, limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                response.close()  # the connection goes: the rest is never read
                raise AnswerTooLarge(response.status, response.headers, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Any request, as httpx hands it over (its timeouts from the request's extensions)."""
        session = self._session or self._open()
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            sock_connect=timeouts.get("connect"), sock_read=timeouts.get("read")
        )
        try:
            async with session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=list(request.headers.multi_items()),
                data=await request.aread() or None,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                content = await response.read()
        except aiohttp.ServerTimeoutError as exc:
            raise httpx.TimeoutException(str(exc), request=request) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx.TransportError(str(exc), request=request) from exc
        return httpx.Response(
            response.status,
            headers=list(response.headers.items()),
            content=content,
            request=request,
            extensions={"reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
