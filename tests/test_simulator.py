from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import openai
import pytest

from stream.devtools.faults import (
    FaultPlan,
    FaultRule,
    Latency,
    Outage,
    parse_faults,
    parse_latency,
)
from stream.devtools.simulator import SimConfig, Simulator
from stream.errors import ConfigError
from tests.kit import ROOT

pytestmark = pytest.mark.anyio

R1 = "hf:deepseek-ai/DeepSeek-R1-0528"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _chat(
    http: aiohttp.ClientSession,
    base: str,
    model: str,
    text: str = "hi",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    async with http.post(f"{base}/chat/completions", json=body, headers=headers) as response:
        raw = await response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw


async def test_the_openai_sdk_talks_to_it() -> None:
    async with Simulator() as sim:
        client = openai.AsyncOpenAI(base_url=sim.url, api_key="sk-any", max_retries=0)
        try:
            done = await client.chat.completions.create(
                model=R1, messages=[{"role": "user", "content": "Why is the sky blue?"}]
            )
            models = await client.models.list()
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(
                    model="moonshotai/Kimi-K2-Instruct",
                    messages=[{"role": "user", "content": "[[sim:429/0.01]]"}],
                )
        finally:
            await client.close()
    assert done.model == R1 and done.id.startswith("chatcmpl-")
    content = done.choices[0].message.content or ""
    assert content.startswith("<think>") and "</think>" in content
    assert done.usage is not None and done.usage.total_tokens > 0
    assert R1 in [m.id for m in models.data]


async def test_it_answers_under_openai_v1_too(http: aiohttp.ClientSession) -> None:
    async with Simulator() as sim:
        status, data = await _chat(http, f"{sim.base}/openai/v1", "deepseek-ai/DeepSeek-R1")
        async with http.get(f"{sim.base}/openai/v1/models") as response:
            assert response.status == 200
    assert status == 200 and data["model"] == "deepseek-ai/DeepSeek-R1"


async def test_json_mode_answers_json_and_thinking_models_reason_in_a_field(
    http: aiohttp.ClientSession,
) -> None:
    async with Simulator() as sim:
        body = {
            "model": "hf:moonshotai/Kimi-K2-Thinking",
            "messages": [{"role": "user", "content": "json please"}],
            "response_format": {"type": "json_object"},
        }
        async with http.post(f"{sim.url}/chat/completions", json=body) as response:
            data = await response.json()
    message = data["choices"][0]["message"]
    assert "answer" in json.loads(message["content"])
    assert message["reasoning_content"]


async def test_bad_requests_get_400(http: aiohttp.ClientSession) -> None:
    async with Simulator() as sim:
        async with http.post(f"{sim.url}/chat/completions", data=b"{nope") as response:
            assert response.status == 400
        async with http.post(f"{sim.url}/chat/completions", json={"model": "m"}) as response:
            assert response.status == 400


async def test_it_is_deterministic_given_a_seed(http: aiohttp.ClientSession) -> None:
    faults = parse_faults("*=rate:0.3:500,rate:0.2:empty")

    async def run(seed: int) -> list[tuple[int, str]]:
        async with Simulator(SimConfig(seed=seed, faults=faults)) as sim:
            seen = []
            for index in range(40):
                status, data = await _chat(http, sim.url, "m", f"q{index}")
                text = data["choices"][0]["message"]["content"] if status == 200 else ""
                seen.append((status, text))
            return seen

    first, again, other = await run(7), await run(7), await run(8)
    assert first == again
    assert first != other
    assert {status for status, _ in first} == {200, 500}
    assert any(status == 200 and not text for status, text in first)  # the "empty" faults


async def test_fault_rates_apply_per_model_pattern(http: aiohttp.ClientSession) -> None:
    plan = parse_faults("hf:*=rate:0.5:503;other=rate:0:500")
    async with Simulator(SimConfig(faults=plan)) as sim:
        for index in range(200):
            await _chat(http, sim.url, "hf:a/b", str(index))
            await _chat(http, sim.url, "other", str(index))
        stats = sim.stats()
    failed = stats["by_model_outcome"]["hf:a/b"].get("503", 0)
    assert 70 <= failed <= 130
    assert stats["by_model_outcome"]["other"] == {"ok": 200}
    assert stats["requests"] == 400


async def test_an_outage_window_fails_matching_models(http: aiohttp.ClientSession) -> None:
    plan = parse_faults("outage=0-3600:hf:*;outage=3000-3600/500:*")
    async with Simulator(SimConfig(faults=plan)) as sim:
        assert (await _chat(http, sim.url, R1))[0] == 503
        assert (await _chat(http, sim.url, "deepseek-ai/DeepSeek-R1"))[0] == 200


async def test_a_forced_fault_by_header_and_429_carries_retry_after(
    http: aiohttp.ClientSession,
) -> None:
    async with Simulator() as sim:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        headers = {"x-sim-fault": "429/2.5"}
        async with http.post(f"{sim.url}/chat/completions", json=body, headers=headers) as r:
            assert r.status == 429
            assert r.headers["retry-after"] == "2.5"
            assert r.headers["retry-after-ms"] == "2500"
        assert (await _chat(http, sim.url, "m", headers={"x-sim-fault": "529"}))[0] == 529


async def test_repeat_markers_fail_n_times_then_succeed(http: aiohttp.ClientSession) -> None:
    async with Simulator() as sim:
        statuses = [(await _chat(http, sim.url, "m", "[[sim:500x2]]"))[0] for _ in range(4)]
        # A different conversation with the same marker has its own count.
        other = (await _chat(http, sim.url, "m", "[[sim:500x2]] again"))[0]
        assert sim.stats()["by_outcome"] == {"500": 3, "ok": 2}
    assert statuses == [500, 500, 200, 200] and other == 500


async def test_latency_is_applied(http: aiohttp.ClientSession) -> None:
    async with Simulator(SimConfig(latency=Latency("fixed", 0.3))) as sim:
        started = time.monotonic()
        await _chat(http, sim.url, "m")
        assert time.monotonic() - started >= 0.3
        started = time.monotonic()
        await _chat(http, sim.url, "m", headers={"x-sim-latency": "0.5"})
        assert time.monotonic() - started >= 0.5


async def test_a_reset_closes_the_connection(http: aiohttp.ClientSession) -> None:
    async with Simulator() as sim:
        with pytest.raises(aiohttp.ClientError):
            await _chat(http, sim.url, "m", "[[sim:reset]]")
        assert sim.stats()["by_outcome"] == {"reset": 1}


async def test_stats_count_and_reset(http: aiohttp.ClientSession) -> None:
    async with Simulator() as sim:
        await _chat(http, sim.url, "a")
        await _chat(http, sim.url, "b", "[[sim:malformed]]")
        async with http.get(f"{sim.base}/sim/stats") as response:
            stats = await response.json()
        assert stats["by_model"] == {"a": 1, "b": 1}
        assert stats["by_outcome"] == {"ok": 1, "malformed": 1}
        async with http.post(f"{sim.base}/sim/reset") as response:
            assert response.status == 200
        assert sim.stats()["requests"] == 0


async def test_a_question_asked_again_counts_as_paid_twice_and_calls_are_traced(
    http: aiohttp.ClientSession,
) -> None:
    async with Simulator(SimConfig(trace=True)) as sim:
        started = time.time()
        for text in ("same question", "another", "same question"):
            await _chat(http, sim.url, "m", text)
        async with http.get(f"{sim.base}/sim/calls") as response:
            calls = await response.json()
        assert (sim.stats()["repeated"], sim.stats()["paid_twice"]) == (1, 1)
        await _chat(http, sim.url, "m", "[[sim:503]] failed")
        await _chat(http, sim.url, "m", "[[sim:503]] failed")
        assert (sim.stats()["repeated"], sim.stats()["paid_twice"]) == (2, 1)  # never answered
    assert calls[0]["key"] == calls[2]["key"] != calls[1]["key"]
    assert all(started <= c["start"] <= c["end"] <= time.time() for c in calls)
    assert {c["outcome"] for c in calls} == {"ok"}


async def test_a_thousand_slow_requests_are_served_concurrently() -> None:
    connector = aiohttp.TCPConnector(limit=1000)
    async with (
        Simulator(SimConfig(latency=Latency("fixed", 1.0))) as sim,
        aiohttp.ClientSession(connector=connector) as http,
    ):
        statuses: list[int] = []

        async def one(index: int) -> None:
            statuses.append((await _chat(http, sim.url, "m", str(index)))[0])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for index in range(1000):
                    tg.start_soon(one, index)
        stats = sim.stats()
    assert statuses == [200] * 1000
    # All 1,000 were inside the 1 s sleep at once: the server never serialised them.
    assert stats["peak_in_flight"] == 1000


def test_fault_spec_grammar() -> None:
    plan = parse_faults(
        "hf:deepseek-ai/DeepSeek-R1-0528=rate:0.2:429,rate:0.1:hang/5; *=rate:0.01:500;"
        "outage=10-70:hf:*;outage=5-6/reset:x"
    )
    assert plan == FaultPlan(
        rules=(
            FaultRule("hf:deepseek-ai/DeepSeek-R1-0528", 0.2, "429"),
            FaultRule("hf:deepseek-ai/DeepSeek-R1-0528", 0.1, "hang/5"),
            FaultRule("*", 0.01, "500"),
        ),
        outages=(Outage(10, 70, "hf:*", "503"), Outage(5, 6, "x", "reset")),
    )
    assert plan.pick(R1, 0.15, 0) == "429"
    assert plan.pick(R1, 0.25, 0) == "hang/5"
    assert plan.pick(R1, 0.305, 0) == "500"
    assert plan.pick(R1, 0.9, 0) is None
    assert plan.pick(R1, 0.9, 10) == "503"
    assert plan.pick("other", 0.005, 20) == "500"


@pytest.mark.parametrize(
    "spec",
    ["nope", "*=rate:2:500", "*=rate:x:500", "*=rate:0.1:boom", "*=often:0.1:500", "outage=9-1:*"],
)
def test_bad_fault_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError, match="fault rule"):
        parse_faults(spec)


def test_latency_specs() -> None:
    assert parse_latency("0.5") == Latency("fixed", 0.5)
    assert parse_latency("uniform:0.1:0.9") == Latency("uniform", 0.1, 0.9)
    assert parse_latency("exp:0.5") == Latency("exp", 0.5)
    assert parse_latency("uniform:1:1") == Latency("uniform", 1.0, 1.0)
    for bad in ("-1", "uniform:1", "gamma:1:2", "x"):
        with pytest.raises(ConfigError, match="latency"):
            parse_latency(bad)
    with pytest.raises(ConfigError, match="LOW is above HIGH; write uniform:1:2"):
        parse_latency("uniform:2:1")


async def test_the_cli_serves_and_documents_its_grammar(http: aiohttp.ClientSession) -> None:
    helped = await anyio.run_process([sys.executable, "-m", "stream", "simulate", "--help"])
    assert b"rate:P:KIND" in helped.stdout and b"[[sim:" in helped.stdout
    from stream.devtools.broker import free_port

    port = free_port()
    command = [sys.executable, "-m", "stream", "simulate", "--port", str(port), "--latency", "0"]
    async with await anyio.open_process([*command, "--seed", "3"], cwd=ROOT) as process:
        try:
            assert process.stdout is not None
            line = await process.stdout.receive()
            assert f"http://127.0.0.1:{port}/v1" in line.decode()
            status, data = await _chat(http, f"http://127.0.0.1:{port}/v1", R1)
            assert status == 200 and data["model"] == R1
        finally:
            process.terminate()
        assert await process.wait() == 0


async def test_the_openai_sdk_streams_chunks_when_asked() -> None:
    async with Simulator() as sim:
        client = openai.AsyncOpenAI(base_url=sim.url, api_key="sk-any", max_retries=0)
        try:
            whole = await client.chat.completions.create(
                model="moonshotai/Kimi-K2-Instruct",
                messages=[{"role": "user", "content": "Stream it."}],
            )
            stream = await client.chat.completions.create(
                model="moonshotai/Kimi-K2-Instruct",
                messages=[{"role": "user", "content": "Stream it."}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
        finally:
            await client.close()
    assert len(chunks) >= 4  # role, content pieces, finish, usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


async def test_answers_carry_ids_rate_limits_and_usage_details(
    http: aiohttp.ClientSession,
) -> None:
    async with Simulator(SimConfig(rate_limit=3, rate_window_s=60)) as sim:
        seen = []
        for _ in range(4):
            body = {
                "model": R1,
                "messages": [
                    {"role": "system", "content": "You answer in one line."},
                    {"role": "user", "content": "Why?"},
                ],
            }
            async with http.post(f"{sim.url}/chat/completions", json=body) as response:
                seen.append((response.status, response.headers, await response.json()))
    statuses = [status for status, _, _ in seen]
    assert statuses == [200, 200, 200, 429]
    remaining = [int(h["x-ratelimit-remaining-requests"]) for _, h, _ in seen[:3]]
    assert remaining == [2, 1, 0]
    assert all(h["x-request-id"].startswith("req_") for _, h, _ in seen)
    assert float(seen[3][1]["retry-after"]) > 0
    first, second = seen[0][2]["usage"], seen[1][2]["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == 5  # the system line, cached
    assert first["completion_tokens_details"]["reasoning_tokens"] > 0


@pytest.mark.parametrize(
    ("kind", "finish", "content"),
    [("length", "length", str), ("tool_calls", "tool_calls", type(None))],
)
async def test_answer_faults_end_as_the_real_apis_say(
    http: aiohttp.ClientSession, kind: str, finish: str, content: type
) -> None:
    async with Simulator() as sim:
        status, data = await _chat(http, sim.url, "moonshotai/Kimi-K2-Instruct", f"[[sim:{kind}]]")
    choice = data["choices"][0]
    assert status == 200 and choice["finish_reason"] == finish
    assert isinstance(choice["message"]["content"], content)
