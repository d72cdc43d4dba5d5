"""Money at the edges, against a provider on loopback that answers what the simulator
cannot: a backlog queued behind a model's first call, usage a provider could not have
billed, answers without usage, and bad 200s that carry usage."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream import compact
from stream.catalog import Model
from stream.config import ProviderSettings, Secret
from stream.errors import ProviderError
from stream.observe.metrics import Metrics
from stream.prices import Price
from stream.providers import Completion, ProviderClient
from stream.providers.retry import Backoff
from stream.spend import Budget
from tests.kit.provider import answer, provider_on

pytestmark = pytest.mark.anyio

PRICE = Price(input=0.6, output=2.5)
KIMI = Model(id="k", provider="synthetic", api_model="hf:k", timeout_s=30, price=PRICE)
FAST = Backoff(base_s=0.001, cap_s=0.001)
USAGE = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
COST = (10 * 0.6 + 20 * 2.5) / 1_000_000  # $0.000056: more than the prompt-only estimate


def _settings(url: str, retries: int = 0) -> ProviderSettings:
    return ProviderSettings(
        name="synthetic", base_url=url, api_key=Secret("sk-test"), max_retries=retries
    )


def _ask(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"question {i}"}]


async def test_a_backlog_queued_behind_a_models_first_call_holds_what_it_revealed() -> None:
    """50 calls arrive at once (a worker started on a backlog): the first runs alone, and
    the 49 behind it must be admitted at what it cost, not at their prompt-only guesses."""
    limit = 0.001
    budget = Budget("live", limit_usd=limit, window_s=600, clock=time.monotonic)
    calls: list[int] = []
    outcomes: list[str] = []
    async with provider_on(lambda n: answer(USAGE), calls) as url:
        async with ProviderClient(_settings(url)) as client:

            async def one(i: int) -> None:
                # The ones that do not fit wait for the limit until their deadline.
                try:
                    await client.complete(KIMI, _ask(i), deadline=time.time() + 3, spend=budget)
                except ProviderError as exc:
                    outcomes.append(exc.error_type)
                else:
                    outcomes.append("ok")

            async with anyio.create_task_group() as group:
                for i in range(50):
                    group.start_soon(one, i)
    assert len(outcomes) == 50
    assert len(calls) * COST <= limit  # every call costs the same: the window stays within
    assert budget.snapshot().spent_usd <= limit + 1e-12
    assert len(calls) == int(limit / COST)  # and it is used, not left idle
    assert outcomes.count("ok") == len(calls) and set(outcomes) == {"ok", "deadline"}


ERROR_WITH_USAGE = {"error": {"message": "upstream model crashed", "code": 500}, "usage": USAGE}
NO_CHOICES = {"id": "x", "model": "hf:k", "choices": [], "usage": USAGE}


@pytest.mark.parametrize("bad", [ERROR_WITH_USAGE, NO_CHOICES], ids=["error", "no-choices"])
async def test_a_bad_200_that_says_what_it_billed_is_counted(bad: dict[str, Any]) -> None:
    budget = Budget("live", limit_usd=1.0, window_s=600)
    calls: list[int] = []
    async with provider_on(lambda n: bad if n == 0 else answer(USAGE), calls) as url:
        async with ProviderClient(_settings(url, retries=1), backoff=FAST) as client:
            done = await client.complete(KIMI, _ask(0), spend=budget)
        async with ProviderClient(_settings(url, retries=0)) as client:
            calls.clear()
            with pytest.raises(ProviderError) as failed:
                await client.complete(KIMI, _ask(1), spend=budget)
    assert done.attempts == 2
    assert done.cost_usd == pytest.approx(2 * COST)  # the bad 200 was paid for too
    assert failed.value.error_type == "malformed_response"
    assert failed.value.cost_usd == pytest.approx(COST)
    assert budget.snapshot().spent_usd == pytest.approx(3 * COST)


def _samples(metrics: Metrics, name: str) -> dict[str, float]:
    """The samples of one counter, by their labels other than provider and model."""
    found = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == name:
                rest = {k: v for k, v in sample.labels.items() if k not in ("provider", "model")}
                found[",".join(rest.values())] = sample.value
    return found


HUGE = 2**63 - 1


async def _two_calls(
    model: Model, usage: dict[str, Any] | None
) -> tuple[list[Completion], Budget, Metrics]:
    """Two calls to `model`, each answered with `usage`, under a roomy spend limit."""
    budget = Budget("live", limit_usd=1.0, window_s=600)
    metrics = Metrics()
    calls: list[int] = []
    async with provider_on(lambda n: answer(usage), calls) as url:
        async with ProviderClient(_settings(url), observer=metrics) as client:
            done = [await client.complete(model, _ask(i), spend=budget) for i in range(2)]
    return done, budget, metrics


async def test_usage_no_provider_could_bill_is_charged_at_the_context_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    small = replace(KIMI, context_tokens=1000)
    bound = (1000 * 0.6 + 1000 * 2.5) / 1_000_000  # the most one call could have cost
    absurd = {"prompt_tokens": HUGE, "completion_tokens": HUGE, "total_tokens": 2**64 - 2}
    done, budget, metrics = await _two_calls(small, absurd)
    assert [d.cost_usd for d in done] == [pytest.approx(bound)] * 2
    assert done[0].usage == absurd  # the result keeps what the provider said
    assert budget.snapshot().spent_usd == pytest.approx(2 * bound)
    assert _samples(metrics, "stream_provider_spend_usd_total") == {"": pytest.approx(2 * bound)}
    tokens = _samples(metrics, "stream_provider_tokens_total")
    assert tokens["prompt"] == tokens["completion"] == 2000
    problems = _samples(metrics, "stream_provider_usage_problems_total")
    assert problems == {"implausible": 2}
    warned = [r for r in caplog.records if "could not have" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"  # once per model


@pytest.mark.parametrize(
    "usage",
    [
        None,
        {"prompt_tokens": -5, "completion_tokens": "20", "total_tokens": True},
        # one total no count, the other fine: the rest was charged as if it were all
        {"prompt_tokens": -500_000, "completion_tokens": 5},
        {"prompt_tokens": 1e30, "completion_tokens": 5},
    ],
    ids=["none", "junk", "negative", "past-64-bits"],
)
async def test_an_answer_without_usage_charges_the_spend_window_what_was_held(
    usage: dict[str, Any] | None, caplog: pytest.LogCaptureFixture
) -> None:
    done, budget, metrics = await _two_calls(KIMI, usage)
    assert [d.cost_usd for d in done] == [None, None]  # not known: not made up
    # Held: the prompt at 3 bytes a token (no max_tokens), the same for both calls.
    body = compact.dumps({"model": KIMI.api_model, "messages": _ask(0)})
    held = len(body) / 3 * 0.6 / 1_000_000
    assert budget.snapshot().spent_usd == pytest.approx(2 * held)
    assert _samples(metrics, "stream_provider_usage_problems_total") == {"missing": 2}
    warned = [r for r in caplog.records if "without usage" in r.getMessage()]
    assert len(warned) == 1
