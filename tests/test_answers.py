"""Answers as the providers give them (issue 13): how each one ended, what it cost, and the
provider's ids, from the simulator over HTTP through both stages to the terminal record."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream.config import Settings
from stream.devtools.faults import parse_faults
from stream.devtools.simulator import SimConfig, Simulator
from stream.observe.metrics import Metrics
from stream.prices import DEFAULT_PRICES
from stream.worker import Worker
from tests.kit.kafka import read_all
from tests.kit.requests import request, send, terminal
from tests.kit.workers import BOTH, simulated_settings, worker_on

pytestmark = pytest.mark.anyio

SCHEMAS = {
    name: jsonschema.Draft7Validator(
        orjson.loads((Settings().topics_dir / f"{name}.schema.json").read_bytes()),
        format_checker=jsonschema.FormatChecker(),
    )
    for name in ("result", "dead-letter", "fallback")
}
# Kimi-K2-Thinking is down on Synthetic, and Together's Kimi is out of credit (402).
FAULTS = "hf:moonshotai/Kimi-K2-Thinking=rate:1:503;moonshotai/Kimi-K2-Instruct=rate:1:402"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(faults=parse_faults(FAULTS))) as simulator:
        yield simulator


async def _run(settings: Settings, items: dict[str, bytes]) -> dict[str, tuple[str, Any]]:
    """Run both stages, send `items` until each has one terminal record; rid → record."""
    async with worker_on(Worker(settings, BOTH)):
        await send(settings, list(items.items()))
        found = await terminal(settings, len(items))
    return {rid: (topic, value) for rid, (topic, value, _) in found.items()}


def _cost(model: str, usage: dict[str, Any]) -> float:
    price = DEFAULT_PRICES[model]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    fresh = usage["prompt_tokens"] - cached
    return (
        fresh * price.input + cached * price.input + usage["completion_tokens"] * price.output
    ) / 1e6


async def test_each_way_an_answer_ends_has_its_terminal_record(
    env: dict[str, str], sim: Simulator
) -> None:
    settings = simulated_settings(env, sim, max_in_flight=50)
    cases = {
        "stop": request("stop", "deepseek-r1-0528-syn", "Why is the sky blue?"),
        "length": request("length", "deepseek-v3-0324-syn", "[[sim:length]] Tell me all."),
        "max-tokens": request(
            "max-tokens", "deepseek-v3-0324-syn", "Go on.", params={"max_tokens": 3}
        ),
        "tools": request("tools", "deepseek-v3-0324-syn", "[[sim:tool_calls]] Look it up."),
        "filtered": request("filtered", "deepseek-r1-0528-syn", "[[sim:content_filter]] x"),
        "too-long": request("too-long", "deepseek-r1-0528-syn", "[[sim:context_length]] x"),
        "no-credit": request("no-credit", "kimi-k2-thinking-syn", "Think."),
        # three empty answers (all of Synthetic's attempts), billed: then Together answers
        "refilled": request("refilled", "deepseek-r1-0528-syn", "[[sim:emptyx3]] Say hi."),
        # three answers cut mid-body (billed, for what nobody can tell), then Together's
        "cut": request("cut", "deepseek-r1-0528-syn", "[[sim:resetbodyx3]] Say hi."),
    }
    found = await _run(settings, cases)
    for _, record in found.values():
        SCHEMAS["result" if "provider" in record else "dead-letter"].validate(record)

    _, stop = found["stop"]
    assert stop["finish_reason"] == "stop" and stop["truncated"] is False
    usage = stop["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0  # R1 thinks
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert stop["cost_usd"] == pytest.approx(_cost("deepseek-r1-0528-syn", usage), abs=1e-9)
    assert stop["provider_request_id"].startswith("chatcmpl-")
    assert stop["tool_calls"] is None and stop["reasoning"]

    for rid in ("length", "max-tokens"):
        _, cut = found[rid]
        assert cut["finish_reason"] == "length" and cut["truncated"] is True, rid
        assert cut["attempts"] == 1  # kept, not retried: the same cut would be paid again
    assert len(found["max-tokens"][1]["content"].split()) == 3

    _, tools = found["tools"]
    assert tools["content"] is None and tools["finish_reason"] == "tool_calls"
    assert tools["tool_calls"][0]["function"]["name"] == "lookup"
    assert tools["attempts"] == 1  # not an empty answer to retry

    topic, filtered = found["filtered"]
    assert topic == settings.topic("predictions.dead-letter")
    assert filtered["reason"] == "content_filter"
    (failure,) = filtered["failures"]
    assert failure["attempts"] == 1 and failure["provider_request_id"].startswith("req_")
    assert failure["cost_usd"] > 0  # a filtered answer is billed

    _, too_long = found["too-long"]
    assert too_long["reason"] == "context_length_exceeded" and "context" in too_long["error"]
    assert too_long["failures"][0]["status"] == 403

    _, no_credit = found["no-credit"]
    assert no_credit["reason"] == "fallback_failed"
    synthetic, together = no_credit["failures"]
    assert synthetic["error_type"] == "unavailable"
    assert synthetic["cost_usd"] == 0.0  # 503s: nothing billed (null would be "unknown")
    assert together["error_type"] == "insufficient_quota" and together["attempts"] == 1
    assert together["status"] == 402 and together["provider_request_id"].startswith("req_")

    by_model = sim.stats()["by_model_outcome"]
    assert by_model["moonshotai/Kimi-K2-Instruct"] == {"402": 1}  # 402 is not retried
    assert by_model["hf:deepseek-ai/DeepSeek-R1-0528"]["content_filter"] == 1
    assert by_model["hf:deepseek-ai/DeepSeek-R1-0528"]["context_length"] == 1
    # Nothing that is the request's own fault went on to the fallback stage.
    hops = await read_all(settings, settings.topic("predictions.fallback"))
    hop = {orjson.loads(h.value)["request_id"]: orjson.loads(h.value) for h in hops}
    assert sorted(hop) == ["cut", "no-credit", "refilled"]

    # A fallback's result costs what both stages were billed.
    _, refilled = found["refilled"]
    paid_first = hop["refilled"]["failure"]
    assert paid_first["error_type"] == "empty_content" and paid_first["cost_usd"] > 0
    assert refilled["fallback"] is True and refilled["attempts"] == paid_first["attempts"] + 1
    answered = _cost("deepseek-r1", refilled["usage"])
    assert refilled["cost_usd"] == pytest.approx(paid_first["cost_usd"] + answered, abs=1e-9)
    # …and is unknown when what the first stage was billed is
    assert hop["cut"]["failure"]["error_type"] == "answer_cut"
    assert hop["cut"]["failure"]["cost_usd"] is None and found["cut"][1]["cost_usd"] is None


def test_metrics_count_tokens_by_kind_spend_and_finish_reasons() -> None:
    metrics = Metrics()
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 60},
        "completion_tokens_details": {"reasoning_tokens": 25},
    }
    metrics.on_answer("synthetic", "deepseek-r1-0528-syn", "stop", usage, 0.0005)
    metrics.on_answer("synthetic", "deepseek-r1-0528-syn", "length", usage, 0.0005)
    metrics.on_answer("together", "deepseek-r1", "content_filter", None, None)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }
    r1 = (("model", "deepseek-r1-0528-syn"), ("provider", "synthetic"))

    def value(name: str, *extra: tuple[str, str]) -> float:
        return samples[(name, tuple(sorted(r1 + extra)))]

    assert value("stream_provider_tokens_total", ("kind", "prompt")) == 200
    assert value("stream_provider_tokens_total", ("kind", "cached")) == 120
    assert value("stream_provider_tokens_total", ("kind", "reasoning")) == 50
    assert value("stream_provider_spend_usd_total") == pytest.approx(0.001)
    assert value("stream_provider_answers_total", ("finish_reason", "length")) == 1
    filtered = (("finish_reason", "content_filter"), ("model", "deepseek-r1"))
    assert samples[("stream_provider_answers_total", (*filtered, ("provider", "together")))] == 1
