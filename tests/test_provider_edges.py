"""A misbehaving provider, over real HTTP on loopback: answers the simulator cannot give
(a 429 that comes while other calls wait for a slot, a gzip bomb), from a small aiohttp
server in the test. Each handler waits on events the test sets, so nothing is ordered by
sleeping."""

from __future__ import annotations

import gzip
import time
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web

from stream.catalog import Model
from stream.config import ProviderSettings, Secret
from stream.errors import FatalProviderError, ProviderError
from stream.providers import ProviderClient
from stream.spend import Budget
from tests.kit import eventually
from tests.kit.provider import FAST, ask, client_of, priced, serving

pytestmark = pytest.mark.anyio

GLM = Model(id="glm-4.6-syn", provider="synthetic", api_model="hf:zai-org/GLM-4.6", timeout_s=30)


def _answer(content: str = "hello") -> dict[str, Any]:
    message = {"role": "assistant", "content": content}
    usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
    return {"id": "r", "choices": [{"message": message, "finish_reason": "stop"}], "usage": usage}


async def test_callers_waiting_for_a_slot_fail_over_at_once_when_a_long_pause_starts() -> None:
    # Two slots: one held by a slow call, one by a call whose answer (a 429 asking for a
    # day) the test releases once three more callers wait for a slot. Their slots would
    # come after their deadlines: they fail over then, not at the model's timeout.
    release_slow, release_429 = anyio.Event(), anyio.Event()

    async def handle(text: str) -> web.StreamResponse:
        if text == "slow":
            await release_slow.wait()
            return web.json_response(_answer())
        await release_429.wait()
        return web.json_response({"error": {}}, status=429, headers={"Retry-After": "86400"})

    failures: dict[str, ProviderError] = {}

    async def call(client: ProviderClient, text: str) -> None:
        try:
            await client.complete(GLM, ask(text), deadline=time.time() + 20)
        except ProviderError as exc:
            failures[text] = exc

    slots = {"max_connections": 2, "initial_concurrency": 2, "max_retries": 0}
    async with client_of(handle, **slots) as (client, calls):
        limiter = client.limiter(GLM)
        async with anyio.create_task_group() as group:
            group.start_soon(call, client, "slow")
            group.start_soon(call, client, "throttled")
            await eventually(lambda: _holds(limiter.snapshot().in_flight == 2), timeout_s=10)
            with anyio.fail_after(15):  # the waiters' deadline is 20 s away
                async with anyio.create_task_group() as waiters:
                    for index in range(3):
                        waiters.start_soon(call, client, f"waiting {index}")
                    await eventually(lambda: _holds(limiter.snapshot().waiting == 3))
                    release_429.set()
            slow_still_out = "slow" not in failures and limiter.snapshot().in_flight == 1
            release_slow.set()
    assert slow_still_out
    assert sorted(calls) == ["slow", "throttled"]  # the waiters never reached the provider
    assert set(failures) == {"throttled", "waiting 0", "waiting 1", "waiting 2"}
    for index in range(3):
        failure = failures[f"waiting {index}"]
        assert failure.error_type == "rate_limited", failure
        assert "rate limit resets after the deadline" in str(failure)


async def _holds(value: bool) -> bool:
    return value


async def test_a_retry_refused_by_a_pause_reports_the_providers_answer_not_the_refusal() -> None:
    # A call is answered 502 just after another call's 429 paused the model for a day:
    # its retry never goes out. The failure is the 502, after the one call that was made.
    answer_502 = anyio.Event()

    async def handle(text: str) -> web.StreamResponse:
        if text == "throttled":
            return web.json_response({"error": {}}, status=429, headers={"Retry-After": "86400"})
        await answer_502.wait()
        return web.json_response({"error": {"message": "bad gateway"}}, status=502)

    async with client_of(handle, max_retries=3) as (client, calls):
        failures: list[ProviderError] = []

        async def call(text: str) -> None:
            try:
                await client.complete(GLM, ask(text), deadline=time.time() + 20)
            except ProviderError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(call, "gateway")
            await eventually(lambda: _holds(calls == ["gateway"]))
            await call("throttled")
            answer_502.set()
    assert calls == ["gateway", "throttled"]
    throttled, gateway = failures
    assert throttled.attempts == 1 and throttled.error_type == "rate_limited"
    assert gateway.status == 502 and gateway.attempts == 1, gateway
    assert "(after 1 attempt); not retried: the provider's rate limit resets" in str(gateway)


async def test_a_gzip_bomb_is_a_failure_not_retried_and_not_read_whole() -> None:
    answer = orjson.dumps(_answer())
    bomb = gzip.compress(answer[:-1] + b" " * (32 * 1024 * 1024) + b"}", 6)

    async def handle(text: str) -> web.StreamResponse:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip", "x-request-id": "b1"})

    async with client_of(handle, max_retries=3) as (client, calls):
        with pytest.raises(FatalProviderError) as caught:
            await client.complete(GLM, ask("bomb"), deadline=time.time() + 20)
    failure = caught.value
    assert calls == ["bomb"]  # once: it would likely come again, and be billed again
    assert failure.error_type == "answer_too_large" and failure.status == 200
    assert failure.attempts == 1 and failure.provider_request_id == "b1"
    assert "over 8,388,608 bytes" in str(failure)


async def test_a_key_echoed_in_an_answer_reaches_no_field_of_it() -> None:
    """A provider (or a proxy) that echoes the key in its request id header, the body's id,
    the model's name, the answer, the reasoning or a tool call, in a 200 or an error: no
    field that goes into a record carries it."""
    key = "sk-edge-test-key"  # client_of's
    echo = f"req {key}"

    async def handle(text: str) -> web.StreamResponse:
        headers = {"x-request-id": f"Bearer {key}"}
        if text == "error":
            return web.json_response({"error": {}}, status=401, headers=headers)
        body = _answer(f"<think>{echo}</think>the key is {key}")
        body.update(id=echo, model=echo)
        body["usage"][key] = 5  # a field named after it
        if text == "tools":
            call = {"id": echo, "type": "function", "function": {"name": "f", "arguments": key}}
            body["choices"][0]["message"]["tool_calls"] = [call]
        if text == "no id":
            del body["id"]  # the header's id is the answer's then
        return web.json_response(body, headers=headers)

    async with client_of(handle) as (client, _):
        done = await client.complete(GLM, ask("answer"))
        with_tools = await client.complete(GLM, ask("tools"))
        without_id = await client.complete(GLM, ask("no id"))
        with pytest.raises(FatalProviderError) as caught:
            await client.complete(GLM, ask("error"))
    texts = [repr(done), repr(with_tools), repr(without_id), repr(vars(caught.value))]
    assert not [text for text in texts if key in text]
    assert done.content == "the key is [redacted]" and done.reasoning == "req [redacted]"
    assert done.provider_model == done.provider_request_id == "req [redacted]"
    assert without_id.provider_request_id == caught.value.provider_request_id
    assert caught.value.provider_request_id == "Bearer [redacted]"


async def test_an_answer_cut_short_is_paid_for_then_tried_again() -> None:
    """A 200 whose body stops short (the connection closed, or a byte that is not UTF-8)
    was answered, and likely billed: it is charged (the spend window takes what was held,
    or the usage it did carry) and tried again. A 503 cut short is still a 503."""
    whole = orjson.dumps(_answer("all of it"))
    spoilt = whole.replace(b"all of it", b"all \xff it")

    async def chat(request: web.Request) -> web.StreamResponse:
        text = orjson.loads(await request.read())["messages"][-1]["content"]
        calls.append(text)
        if text == "prime" or calls.count(text) > 1:
            return web.json_response(_answer("all of it"))
        if text == "spoilt":
            return web.Response(body=spoilt, content_type="application/json")
        cut = web.StreamResponse(status=503 if text == "busy" else 200)
        cut.content_length = len(whole)
        await cut.prepare(request)
        await cut.write(whole[: len(whole) // 2])
        assert request.transport is not None
        request.transport.close()  # half the answer, then the connection goes
        return cut

    calls: list[str] = []
    model, budget = priced("edge"), Budget("live", limit_usd=1.0, window_s=60)
    async with serving(chat) as url:
        settings = ProviderSettings(name="synthetic", base_url=url, api_key=Secret("k"))
        async with ProviderClient(settings, backoff=FAST) as client:
            first = await client.complete(model, ask("prime"), spend=budget)  # a known cost
            cut = await client.complete(model, ask("cut"), spend=budget)
            spent_before = budget.snapshot().spent_usd
            spoilt_ = await client.complete(model, ask("spoilt"), spend=budget)
            spent_spoilt = budget.snapshot().spent_usd - spent_before
            busy = await client.complete(model, ask("busy"))
    assert first.attempts == 1 and first.cost_usd == pytest.approx(30e-6)
    # the cut answer's cost is unknown: held at the dearest call so far (30 tokens' worth)
    assert cut.attempts == 2 and cut.cost_usd is None and cut.content == "all of it"
    assert spent_before == pytest.approx(3 * 30e-6)
    # the spoilt answer's usage was read (the bytes around it are JSON): billed as it says
    assert spoilt_.attempts == 2 and spoilt_.cost_usd == pytest.approx(2 * 30e-6)
    assert spent_spoilt == pytest.approx(2 * 30e-6)
    assert busy.attempts == 2  # a 503 (retried as one), whatever became of its body
    assert calls.count("cut") == calls.count("spoilt") == calls.count("busy") == 2


async def test_a_429_that_ran_out_of_retries_does_not_blame_the_deadline() -> None:
    async def handle(text: str) -> web.StreamResponse:
        return web.json_response({"error": {}}, status=429, headers={"Retry-After": "1"})

    async with client_of(handle, max_retries=0) as (client, _):
        with pytest.raises(ProviderError) as caught:
            await client.complete(GLM, ask("hi"), deadline=time.time() + 60)
    assert caught.value.attempts == 1 and caught.value.error_type == "rate_limited"
    assert "deadline" not in str(caught.value), caught.value
