"""ProviderClient over real HTTP on loopback against the simulator (MockTransport only where
an exact response is needed: echoed keys, a served model name, x-should-retry)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream.catalog import Model
from stream.config import ProviderSettings, Secret
from stream.devtools.simulator import SimConfig, Simulator
from stream.errors import (
    CircuitOpenError,
    FatalProviderError,
    ProviderError,
    RetryableProviderError,
)
from stream.observe.metrics import Metrics
from stream.providers import Backoff, BreakerConfig, Clock, ProviderClient
from stream.providers.transport import MAX_ANSWER_BYTES

pytestmark = pytest.mark.anyio

KEY = "sk-test-DO-NOT-LEAK-7f3a9c21"
R1 = Model(
    id="deepseek-r1-0528-syn",
    provider="synthetic",
    api_model="hf:deepseek-ai/DeepSeek-R1-0528",
    timeout_s=30.0,
)
KIMI = Model(
    id="kimi-k2-thinking-syn",
    provider="synthetic",
    api_model="hf:moonshotai/Kimi-K2-Thinking",
    timeout_s=30.0,
)
GLM = Model(id="glm-4.6-syn", provider="synthetic", api_model="hf:zai-org/GLM-4.6", timeout_s=30)
FAST = Backoff(base_s=0.001, cap_s=0.01)


class Recorder:
    def __init__(self) -> None:
        self.attempts: list[str] = []
        self.retries: list[str] = []
        self.breaker: list[str] = []
        self.answers: list[tuple[str | None, float | None]] = []
        self.usage_problems: list[str] = []

    def on_attempt(self, provider: str, model: str, status_class: str, seconds: float) -> None:
        assert seconds >= 0
        self.attempts.append(status_class)

    def on_retry(self, provider: str, model: str, error_type: str) -> None:
        self.retries.append(error_type)

    def on_breaker(self, provider: str, model: str, state: str) -> None:
        self.breaker.append(state)

    def on_answer(
        self,
        provider: str,
        model: str,
        finish_reason: str | None,
        usage: Mapping[str, Any] | None,
        cost_usd: float | None,
    ) -> None:
        self.answers.append((finish_reason, cost_usd))

    def on_usage_problem(self, provider: str, model: str, problem: str) -> None:
        self.usage_problems.append(problem)


def _settings(url: str, *, retries: int = 2, key: str = KEY) -> ProviderSettings:
    return ProviderSettings(
        name="synthetic", base_url=url, api_key=Secret(key), max_retries=retries, timeout_s=30
    )


def _ask(text: str = "hello") -> list[dict[str, Any]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(api_key=KEY)) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[ProviderClient]:
    async with ProviderClient(_settings(sim.url), backoff=FAST) as provider:
        yield provider


async def test_a_completion_carries_content_reasoning_usage_and_model(
    client: ProviderClient, sim: Simulator
) -> None:
    done = await client.complete(R1, _ask(), {"temperature": 0.2}, request_id="r-1")
    assert done.content and "<think>" not in done.content and "</think>" not in done.content
    assert done.reasoning and "think about" in done.reasoning
    assert done.usage is not None and done.usage["total_tokens"] == (
        done.usage["prompt_tokens"] + done.usage["completion_tokens"]  # type: ignore[operator]
    )
    assert done.provider == "synthetic" and done.provider_model == R1.api_model
    assert done.attempts == 1 and done.latency_ms > 0
    assert sim.stats()["by_model"] == {R1.api_model: 1}


async def test_reasoning_content_field_is_taken_too(client: ProviderClient) -> None:
    done = await client.complete(KIMI, _ask())
    assert done.reasoning and "think about" in done.reasoning
    plain = await client.complete(GLM, _ask())
    assert plain.reasoning is None


@pytest.mark.parametrize("status", [408, 409, 425, 500, 502, 503, 504, 524, 529])
async def test_retryable_statuses_are_retried_then_raised(
    client: ProviderClient, sim: Simulator, status: int
) -> None:
    with pytest.raises(RetryableProviderError) as caught:
        await client.complete(GLM, _ask(f"[[sim:{status}]]"))
    assert caught.value.status == status and caught.value.attempts == 3
    assert sim.stats()["by_outcome"] == {str(status): 3}


async def test_429_is_retried_and_insufficient_quota_is_not(
    client: ProviderClient, sim: Simulator
) -> None:
    with pytest.raises(RetryableProviderError) as limited:
        await client.complete(GLM, _ask("[[sim:429/0.01]]"))
    assert limited.value.error_type == "rate_limited" and limited.value.attempts == 3
    # The simulator announced room for all 1000 at once; the 429s halved it, for GLM only.
    assert client.limiter(GLM).limit < client.settings.max_connections
    assert client.limiter(R1).limit == client.settings.initial_concurrency
    with pytest.raises(FatalProviderError) as quota:
        await client.complete(GLM, _ask("[[sim:quota]]"))
    assert quota.value.error_type == "insufficient_quota" and quota.value.attempts == 1
    assert sim.stats()["by_outcome"] == {"429": 3, "quota": 1}


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 413, 422])
async def test_fatal_statuses_are_not_retried(
    client: ProviderClient, sim: Simulator, status: int
) -> None:
    with pytest.raises(FatalProviderError) as caught:
        await client.complete(GLM, _ask(f"[[sim:{status}]]"))
    assert caught.value.status == status and caught.value.attempts == 1
    assert sim.stats()["requests"] == 1


async def test_a_wrong_key_is_a_fatal_401_and_said_once_a_minute(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing else tells an operator: the breaker takes no side, and every request fails
    over (and is paid for) on the fallback."""
    async with ProviderClient(_settings(sim.url, key="sk-wrong-SECRET")) as wrong:
        for _ in range(3):
            with pytest.raises(FatalProviderError) as caught:
                await wrong.complete(GLM, _ask())
            assert caught.value.status == 401 and caught.value.error_type == "unauthorized"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    refused = [m for m in warned if "refused the call" in m]
    assert len(refused) == 1, warned
    assert "HTTP 401 unauthorized; check SYNTHETIC_API_KEY" in refused[0]
    assert "SECRET" not in caplog.text


async def test_retries_then_success(client: ProviderClient, sim: Simulator) -> None:
    done = await client.complete(GLM, _ask("[[sim:503x2]]"))
    assert done.attempts == 3
    assert sim.stats()["by_outcome"] == {"503": 2, "ok": 1}


@pytest.mark.parametrize(
    ("kind", "error_type"),
    [
        ("reset", "connect_error"),
        ("malformed", "malformed_response"),
        ("empty", "empty_content"),
    ],
)
async def test_transport_faults_and_bad_200s_are_retryable(
    client: ProviderClient, sim: Simulator, kind: str, error_type: str
) -> None:
    with pytest.raises(RetryableProviderError) as caught:
        await client.complete(GLM, _ask(f"[[sim:{kind}]]"))
    assert caught.value.error_type == error_type and caught.value.attempts == 3
    assert sim.stats()["by_outcome"] == {kind: 3}


async def test_json_mode_checks_the_output(client: ProviderClient, sim: Simulator) -> None:
    form = {"response_format": {"type": "json_object"}}
    done = await client.complete(GLM, _ask("give json"), form)
    assert isinstance(orjson.loads(done.content), dict)
    with pytest.raises(RetryableProviderError) as caught:
        await client.complete(GLM, _ask("[[sim:notjson]]"), form)
    assert caught.value.error_type == "invalid_json_output"
    # Prose is fine when JSON was not asked for.
    assert (await client.complete(GLM, _ask("[[sim:notjson]]"))).content


@pytest.mark.parametrize(
    ("kind", "params", "outcome", "finish"),
    [
        # Billed but unusable: counted by how the provider said they ended, not as "none".
        ("empty", {}, "empty_content", "stop"),
        ("notjson", {"response_format": {"type": "json_object"}}, "invalid_json_output", "stop"),
        ("content_filter", {}, "content_filter", "content_filter"),
        # Cut at max_tokens before any text: a result, flagged, and counted as cut.
        ("empty", {"max_tokens": 1}, "truncated", "length"),
    ],
)
async def test_billed_answers_are_counted_by_their_finish_reason(
    sim: Simulator, kind: str, params: dict[str, Any], outcome: str, finish: str
) -> None:
    metrics = Metrics()
    async with ProviderClient(_settings(sim.url, retries=0), observer=metrics) as client:
        try:
            done = await client.complete(GLM, _ask(f"[[sim:{kind}]]"), params)
        except ProviderError as exc:
            assert exc.error_type == outcome
        else:
            assert outcome == "truncated" and done.truncated and done.content is None
    counted = {
        sample.labels["finish_reason"]: sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
        if sample.name == "stream_provider_answers_total"
    }
    assert counted == {finish: 1}


async def test_retry_after_ms_is_waited_out(client: ProviderClient, sim: Simulator) -> None:
    started = time.monotonic()
    done = await client.complete(GLM, _ask("[[sim:429/0.4x1]]"))
    assert done.attempts == 2
    assert time.monotonic() - started >= 0.4


async def test_retry_after_seconds_is_waited_out() -> None:
    calls: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(429, headers={"retry-after": "1"}, json={"error": {}})
        return _ok(request)

    async with _mocked(answer) as client:
        done = await client.complete(GLM, _ask())
    assert done.attempts == 2 and calls[1] - calls[0] >= 1.0


async def test_an_exhausted_quota_header_pauses_new_calls() -> None:
    calls: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        response = _ok(request)
        if len(calls) == 1:
            response.headers["x-ratelimit-remaining-requests"] = "0"
            response.headers["x-ratelimit-reset-requests"] = "400ms"
        return response

    async with _mocked(answer) as client:
        await client.complete(GLM, _ask())
        await client.complete(GLM, _ask())
    assert calls[1] - calls[0] >= 0.4


async def test_x_should_retry_overrides_the_status() -> None:
    seen: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) == 1:
            return httpx.Response(400, headers={"x-should-retry": "true"}, json={})
        if len(seen) == 2:
            return httpx.Response(500, headers={"x-should-retry": "false"}, json={})
        return _ok(request)

    async with _mocked(answer) as client:
        with pytest.raises(FatalProviderError) as caught:
            await client.complete(GLM, _ask())
    assert caught.value.status == 500 and caught.value.attempts == 2


async def test_retries_stop_at_the_deadline_instead_of_sleeping_past_it(
    client: ProviderClient, sim: Simulator
) -> None:
    # The provider asks for 5 s; the deadline is 1 s away: raise now, do not sleep.
    with anyio.fail_after(4.5):
        with pytest.raises(RetryableProviderError) as caught:
            await client.complete(GLM, _ask("[[sim:429/5]]"), deadline=time.time() + 1.0)
    assert caught.value.attempts == 1 and caught.value.error_type == "rate_limited"
    assert sim.stats()["requests"] == 1


async def test_a_hang_is_cut_at_the_deadline(client: ProviderClient, sim: Simulator) -> None:
    started = time.monotonic()
    with pytest.raises(RetryableProviderError) as caught:
        await client.complete(GLM, _ask("[[sim:hang/60]]"), deadline=time.time() + 0.5)
    assert caught.value.error_type == "timeout" and caught.value.attempts == 1
    assert time.monotonic() - started >= 0.45  # it did wait for the answer until then
    assert sim.stats()["by_outcome"] == {"hang": 1}


async def test_the_model_timeout_bounds_the_whole_loop(
    client: ProviderClient, sim: Simulator
) -> None:
    quick = Model(id="q", provider="synthetic", api_model="hf:q", timeout_s=0.3)
    with pytest.raises(RetryableProviderError) as caught:
        await client.complete(quick, _ask("[[sim:hang/60]]"))
    assert caught.value.error_type == "timeout" and caught.value.attempts == 1


async def test_a_past_deadline_is_not_called(client: ProviderClient, sim: Simulator) -> None:
    with pytest.raises(RetryableProviderError) as caught:
        await client.complete(GLM, _ask(), deadline=time.time() - 1)
    assert caught.value.error_type == "deadline" and caught.value.attempts == 0
    assert sim.stats()["requests"] == 0


class FakeTime:
    """Both of the client's clocks, moved by the test: a cool-down passes in no time."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def clock(self) -> Clock:
        return Clock(monotonic=lambda: self.now, wall=lambda: 1.7e9 + self.now)


def _timed_client(
    sim: Simulator, recorder: Recorder, time_: FakeTime, min_calls: int
) -> ProviderClient:
    """A client on the moved clock whose breaker opens after `min_calls` failures."""
    config = BreakerConfig(window_s=60, min_calls=min_calls, failure_rate=0.5, cooldown_s=15)
    settings = _settings(sim.url, retries=0)
    return ProviderClient(settings, observer=recorder, breaker=config, clock=time_.clock())


async def _fail(client: ProviderClient, times: int) -> None:
    for _ in range(times):
        with pytest.raises(RetryableProviderError):
            await client.complete(GLM, _ask("[[sim:500]]"))


async def test_breaker_opens_probes_and_closes(sim: Simulator) -> None:
    recorder, time_ = Recorder(), FakeTime()
    async with _timed_client(sim, recorder, time_, min_calls=4) as client:
        await _fail(client, 4)
        assert client.breaker_state(GLM) == "open"
        with pytest.raises(CircuitOpenError) as caught:
            await client.complete(GLM, _ask())
        assert caught.value.attempts == 0 and sim.stats()["requests"] == 4
        assert client.breaker_state(R1) == "closed"  # per model
        time_.now += 15
        assert client.breaker_state(GLM) == "half_open"
        await _fail(client, 1)  # the probe fails
        assert client.breaker_state(GLM) == "open"
        time_.now += 15
        assert (await client.complete(GLM, _ask())).attempts == 1  # the probe passes
        assert client.breaker_state(GLM) == "closed"
    assert recorder.breaker == ["open", "half_open", "open", "half_open", "closed"]
    assert sim.stats()["requests"] == 6


async def test_reading_the_breaker_state_reports_nothing(sim: Simulator) -> None:
    # Reading is not acting: the transition is reported once, by the call that acts on it.
    recorder, time_ = Recorder(), FakeTime()
    async with _timed_client(sim, recorder, time_, min_calls=2) as client:
        await _fail(client, 2)
        time_.now += 15
        for _ in range(3):
            assert client.breaker_state(GLM) == "half_open"
        assert recorder.breaker == ["open"]
        await client.complete(GLM, _ask())
    assert recorder.breaker == ["open", "half_open", "closed"]


async def test_a_deadline_is_read_on_the_injected_wall_clock(sim: Simulator) -> None:
    time_ = FakeTime()
    async with ProviderClient(_settings(sim.url), clock=time_.clock()) as client:
        wall = time_.clock().wall()
        with pytest.raises(RetryableProviderError) as caught:
            await client.complete(GLM, _ask(), deadline=wall - 1)
        assert caught.value.error_type == "deadline"
        assert (await client.complete(GLM, _ask(), deadline=wall + 5)).attempts == 1
    assert sim.stats()["requests"] == 1


async def test_our_own_bad_requests_do_not_open_the_breaker(sim: Simulator) -> None:
    config = BreakerConfig(window_s=60, min_calls=2, failure_rate=0.5, cooldown_s=60)
    async with ProviderClient(_settings(sim.url, retries=0), breaker=config) as client:
        for _ in range(5):
            with pytest.raises(FatalProviderError):
                await client.complete(GLM, _ask("[[sim:400]]"))
        assert client.breaker_state(GLM) == "closed"


async def test_observer_hears_attempts_and_retries(sim: Simulator) -> None:
    recorder = Recorder()
    async with ProviderClient(_settings(sim.url), observer=recorder, backoff=FAST) as client:
        await client.complete(GLM, _ask("[[sim:500x1]]"))
        with pytest.raises(RetryableProviderError):
            await client.complete(GLM, _ask("[[sim:hang/60]]"), deadline=time.time() + 0.2)
        with pytest.raises(RetryableProviderError):
            await client.complete(GLM, _ask("[[sim:reset]]"))
    assert recorder.attempts == ["5xx", "2xx", "timeout", "connect", "connect", "connect"]
    assert recorder.retries == ["server_error", "connect_error", "connect_error"]


async def test_a_thousand_concurrent_callers_respect_max_connections() -> None:
    async with Simulator(SimConfig(latency=_latency(0.05))) as sim:
        settings = ProviderSettings(
            name="synthetic", base_url=sim.url, api_key=Secret(KEY), max_connections=50
        )
        results: list[int] = []
        async with ProviderClient(settings) as client:

            async def one(index: int) -> None:
                results.append((await client.complete(GLM, _ask(str(index)))).attempts)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for index in range(1000):
                        tg.start_soon(one, index)
        stats = sim.stats()
    assert results == [1] * 1000
    assert stats["requests"] == 1000 and stats["peak_in_flight"] <= 50


async def test_the_key_never_shows_in_logs_errors_or_reprs(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with ProviderClient(_settings(sim.url), backoff=FAST) as client:
        texts.append(repr(client))
        texts.append(repr(client.settings))
        await client.complete(R1, _ask())
        for marker in ("[[sim:401]]", "[[sim:500]]", "[[sim:reset]]", "[[sim:malformed]]"):
            with pytest.raises(Exception) as caught:
                await client.complete(R1, _ask(marker))
            texts += [str(caught.value), repr(caught.value), repr(vars(caught.value))]
    async with _mocked(_echo_key) as echoing:
        with pytest.raises(FatalProviderError) as echoed:
            await echoing.complete(GLM, _ask())
        texts += [str(echoed.value), repr(vars(echoed.value))]
    assert "[redacted]" in str(echoed.value)  # the provider did echo it back
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(vars(record)) for record in caplog.records]
    assert len(caplog.records) > 5
    assert not [text for text in texts if KEY in text]


@pytest.mark.parametrize("filler", [0, 262])  # 262: the key straddles the message's cut
async def test_a_key_echoed_json_escaped_is_still_redacted(filler: int) -> None:
    def escaped(request: httpx.Request) -> httpx.Response:
        key = request.headers["authorization"].removeprefix("Bearer ")
        hidden = "".join(f"\\u{ord(char):04x}" for char in key)  # every char \uXXXX
        message = "x" * filler + f"Incorrect API key provided: {hidden}"
        body = '{"error": {"message": "' + message + '", "code": "invalid_api_key"}}'
        return httpx.Response(401, content=body.encode())

    async with _mocked(escaped) as client:
        with pytest.raises(FatalProviderError) as caught:
            await client.complete(GLM, _ask())
    text = str(caught.value)
    assert KEY not in text and KEY[:8] not in text


async def test_the_served_model_name_is_reported() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert request.url.path == "/v1/chat/completions"
        body = orjson.loads(request.content)
        assert body["model"] == GLM.api_model and body["temperature"] == 0
        return _ok(request, model="zai-org/GLM-4.6-FP8")

    async with _mocked(answer) as client:
        done = await client.complete(GLM, _ask(), {"temperature": 0, "model": "x", "stream": True})
    assert done.provider_model == "zai-org/GLM-4.6-FP8"


def _latency(seconds: float) -> Any:
    from stream.devtools.faults import Latency

    return Latency("fixed", seconds)


def _ok(request: httpx.Request, *, model: str | None = None) -> httpx.Response:
    body = orjson.loads(request.content)
    message = {"role": "assistant", "content": "fine"}
    return httpx.Response(
        200,
        json={
            "id": "x",
            "model": model or body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
    )


def _echo_key(request: httpx.Request) -> httpx.Response:
    key = request.headers["authorization"].removeprefix("Bearer ")
    error = {"message": f"Incorrect API key provided: {key}", "code": "invalid_api_key"}
    return httpx.Response(401, json={"error": error})


def _mocked(handler: Callable[[httpx.Request], httpx.Response]) -> ProviderClient:
    transport = httpx.MockTransport(handler)
    return ProviderClient(_settings("http://provider.test/v1"), transport=transport, backoff=FAST)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",  # a header aiohttp cannot parse
        b"HTTP/1.1 2x0 OK\r\n\r\n",  # a broken status line
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nnot z",
    ],
)
async def test_a_garbled_http_answer_is_a_retryable_provider_error(answer: bytes) -> None:
    # Not a crash that skips the fallback: the stage only hands on our provider errors.
    async with _answering(answer, retries=1) as provider:
        with pytest.raises(RetryableProviderError) as caught:
            await provider.complete(GLM, _ask())
    assert caught.value.attempts == 2


@pytest.mark.parametrize(
    ("status", "content"),
    [(200, "fine"), (200, ""), (500, None)],  # an answer, an unusable 200, an error
)
async def test_a_long_request_id_is_cut_whatever_the_answer(
    status: int, content: str | None
) -> None:
    rid = "req_" + "7" * 496
    if content is None:
        body = b'{"error": {"message": "boom", "type": "server_error"}}'
    else:
        message = {"role": "assistant", "content": content}
        body = orjson.dumps({"choices": [{"message": message, "finish_reason": "stop"}]})
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nx-request-id: {rid}\r\n"
    answer = head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body
    async with _answering(answer, retries=0) as provider:
        try:
            quoted = (await provider.complete(GLM, _ask())).provider_request_id
        except ProviderError as exc:
            quoted = exc.provider_request_id
    assert quoted == rid[:200]


@asynccontextmanager
async def _answering(answer: bytes, *, retries: int) -> AsyncIterator[ProviderClient]:
    """A client of a server on loopback that answers every request with `answer`, as is."""

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(answer)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, serve)
        url = f"http://127.0.0.1:{port}/v1"
        async with ProviderClient(_settings(url, retries=retries), backoff=FAST) as provider:
            yield provider
        group.cancel_scope.cancel()


async def test_a_retry_after_past_the_deadline_holds_back_the_model_within_reason() -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(orjson.loads(request.content)["model"])
        return httpx.Response(429, headers={"retry-after": "86400"}, json={"error": {}})

    async with _mocked(answer) as client:
        with pytest.raises(RetryableProviderError) as first:
            await client.complete(GLM, _ask(), deadline=time.time() + 30)
        assert first.value.attempts == 1 and "past the deadline" in str(first.value)
        with pytest.raises(RetryableProviderError) as second:
            await client.complete(GLM, _ask(), deadline=time.time() + 30)
        paused_for = client.limiter(GLM).snapshot().paused_for_s
    assert calls == [GLM.api_model]  # the second request failed over without calling
    assert second.value.error_type == "rate_limited" and second.value.attempts == 0
    assert str(second.value).endswith("(not called)")
    assert 0 < paused_for <= 300  # a day asked for, five minutes held: then one call asks again


async def test_another_transports_answer_is_read_up_to_the_limit_too() -> None:
    def endless(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b" " * (MAX_ANSWER_BYTES + 1))

    async with _mocked(endless) as client:
        with pytest.raises(FatalProviderError) as caught:
            await client.complete(GLM, _ask())
    assert caught.value.error_type == "answer_too_large" and caught.value.attempts == 1
