"""Our httpx transport over aiohttp, on real HTTP on loopback against the simulator: its fast
`post` (what the provider client uses) and its httpx face (any `httpx.AsyncClient`)."""

from __future__ import annotations

import gzip
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from aiohttp import web
from yarl import URL

from stream.config import ProviderSettings, Secret
from stream.devtools.simulator import SimConfig, Simulator
from stream.errors import ConfigError
from stream.providers.client import ProviderClient
from stream.providers.transport import MAX_ANSWER_BYTES, AiohttpTransport, AnswerTooLarge
from tests.kit.provider import serving

pytestmark = pytest.mark.anyio

KEY = "sk-transport-test"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def _body(text: str = "hello") -> bytes:
    messages = [{"role": "user", "content": text}]
    return orjson.dumps({"model": "hf:zai-org/GLM-4.6", "messages": messages})


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(api_key=KEY)) as simulator:
        yield simulator


async def test_post_sends_the_default_headers_and_reads_the_whole_answer(sim: Simulator) -> None:
    transport = AiohttpTransport(max_connections=4, connect_timeout_s=5, headers=HEADERS)
    try:
        answer = await transport.post(URL(f"{sim.url}/chat/completions"), _body(), 10)
    finally:
        await transport.aclose()
    assert answer.status == 200 and answer.reason == "OK"
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"]
    # headers are case-insensitive, as HTTP has them
    assert answer.headers["X-Request-Id"] == answer.headers["x-request-id"]
    assert sim.stats()["requests"] == 1


async def test_a_client_opens_its_pool_on_entry_and_says_when_certificates_cannot_load(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Entered, a client has its pool (the certificates read, ~30 ms, before the first wave
    of calls rather than in it), and calls through it; with a CA file that cannot be
    read, entering fails with one line that names the setting, instead of every call."""
    settings = ProviderSettings(name="synthetic", base_url=sim.url, api_key=Secret(KEY))
    async with ProviderClient(settings) as client:
        transport = client._http._transport
        assert isinstance(transport, AiohttpTransport) and transport._session is not None
        opened = transport._session
        answer = await transport.post(URL(f"{sim.url}/chat/completions"), _body(), 10)
        assert answer.status == 200 and transport._session is opened
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"CA certificates .* unset SSL_CERT_FILE / SSL_CERT_DIR"):
        async with ProviderClient(settings):
            pass


async def test_post_is_cut_at_its_timeout(sim: Simulator) -> None:
    transport = AiohttpTransport(max_connections=4, connect_timeout_s=5, headers=HEADERS)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            await transport.post(URL(f"{sim.url}/chat/completions"), _body("[[sim:hang/60]]"), 0.2)
    finally:
        await transport.aclose()
    assert time.monotonic() - started < 5


async def test_post_decompresses_a_gzipped_answer() -> None:
    async def gzipped(request: web.Request) -> web.Response:
        body = gzip.compress(b'{"ok": true}')
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    transport = AiohttpTransport(max_connections=1, connect_timeout_s=5)
    async with serving(gzipped) as base:
        try:
            answer = await transport.post(URL(f"{base}/chat/completions"), b"{}", 5)
        finally:
            await transport.aclose()
    assert orjson.loads(answer.body) == {"ok": True}


async def test_an_httpx_client_works_through_it(sim: Simulator) -> None:
    transport = AiohttpTransport(max_connections=4, connect_timeout_s=5)
    async with httpx.AsyncClient(transport=transport, headers=HEADERS) as client:
        stats = await client.get(f"{sim.base}/sim/stats")
        done = await client.post(f"{sim.url}/chat/completions", content=_body())
        with pytest.raises(httpx.TimeoutException):
            await client.post(
                f"{sim.url}/chat/completions", content=_body("[[sim:hang/60]]"), timeout=0.2
            )
    assert stats.status_code == 200 and "requests" in stats.json()
    assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"]
    assert done.headers["x-request-id"] and done.reason_phrase == "OK"


async def test_a_refused_connection_is_an_httpx_transport_error() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    transport = AiohttpTransport(max_connections=1, connect_timeout_s=5)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_a_gzip_bomb_is_not_inflated_past_the_answer_limit() -> None:
    # 64 MiB of spaces inside a JSON answer: 64 KiB on the wire.
    bomb = gzip.compress(b'{"choices": []' + b" " * (64 * 1024 * 1024) + b"}", 6)

    async def bombing(request: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

    transport = AiohttpTransport(max_connections=1, connect_timeout_s=5)
    async with serving(bombing) as base:
        url = URL(f"{base}/chat/completions")
        tracemalloc.start()
        try:
            with pytest.raises(AnswerTooLarge) as caught:
                await transport.post(url, b"{}", 30)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            await transport.aclose()
    assert caught.value.status == 200
    assert peak < MAX_ANSWER_BYTES * 2, peak  # one bounded buffer, not 64 MiB


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_past_the_limit_is_not_read_whatever_its_framing(framing: str) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if framing == "content-length":
            response.content_length = 12 * 1024 * 1024
        await response.prepare(request)
        for _ in range(12):
            await response.write(b" " * (1024 * 1024))
        return response

    transport = AiohttpTransport(max_connections=1, connect_timeout_s=5)
    async with serving(huge) as base:
        url = URL(f"{base}/chat/completions")
        try:
            with pytest.raises(AnswerTooLarge):
                await transport.post(url, b"{}", 30)
        finally:
            await transport.aclose()
