"""What the breaker and the limiter hear from each kind of attempt (`attempts.judge`),
over real HTTP on loopback against the simulator: every status, bad 200 and transport
failure a provider can hand back, read by `ProviderHTTP` as in production."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
import pytest

from stream.config import ProviderSettings, Secret
from stream.devtools.broker import free_port
from stream.devtools.simulator import SimConfig, Simulator
from stream.providers.attempts import judge
from stream.providers.http import ProviderHTTP

pytestmark = pytest.mark.anyio

KEY = "sk-test-judge-3b1e"

# fault kind → (breaker outcome, limiter throttled). A provider fault (5xx but 501-style
# unknowns, 408, transport failures, unusable 200s) opens the breaker; a throttle (429,
# 503, 529, but not an exhausted quota) shrinks the limiter; the request's own faults
# (4xx, bad JSON, a filtered answer) do neither.
TABLE: dict[str | None, tuple[str, bool]] = {
    None: ("success", False),
    "length": ("success", False),
    "tool_calls": ("success", False),
    "429/0.01": ("neutral", True),
    "quota": ("neutral", False),
    "402": ("neutral", False),
    "context_length": ("neutral", False),
    "400": ("neutral", False),
    "401": ("neutral", False),
    "403": ("neutral", False),
    "404": ("neutral", False),
    "409": ("neutral", False),
    "413": ("neutral", False),
    "418": ("neutral", False),
    "422": ("neutral", False),
    "425": ("neutral", False),
    "201": ("neutral", False),
    "408": ("failure", False),
    "500": ("failure", False),
    "501": ("failure", False),
    "502": ("failure", False),
    "503": ("failure", True),
    "504": ("failure", False),
    "524": ("failure", False),
    "529": ("failure", True),
    "malformed": ("failure", False),
    "empty": ("failure", False),
    "notjson": ("neutral", False),
    "content_filter": ("neutral", False),
    "reset": ("failure", False),
    "resetbody": ("failure", False),
    "hang/5": ("failure", False),
}


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(api_key=KEY)) as simulator:
        yield simulator


def _http(url: str) -> ProviderHTTP:
    return ProviderHTTP(ProviderSettings(name="synthetic", base_url=url, api_key=Secret(KEY)))


def _body(kind: str | None) -> bytes:
    text = f"hello [[sim:{kind}]]" if kind else "hello"
    messages = [{"role": "user", "content": text}]
    return orjson.dumps(
        {"model": "m", "messages": messages, "response_format": {"type": "json_object"}}
    )


@pytest.mark.parametrize("kind", list(TABLE))
async def test_judge_of_each_kind_of_attempt(sim: Simulator, kind: str | None) -> None:
    http = _http(sim.url)
    try:
        # A short end: `hang` must time out here, not after the default timeout.
        exchange = await http.send(_body(kind), True, time.monotonic() + 2.0)
    finally:
        await http.aclose()
    assert judge(exchange.result) == TABLE[kind], exchange.result


async def test_judge_of_a_refused_connection() -> None:
    http = _http(f"http://127.0.0.1:{free_port()}/v1")
    try:
        exchange = await http.send(_body(None), False, time.monotonic() + 2.0)
    finally:
        await http.aclose()
    assert judge(exchange.result) == ("failure", False), exchange.result
