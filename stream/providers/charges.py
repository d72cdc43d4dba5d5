"""What one billed answer is charged: its `usage` at the catalog's prices, when believable.

A usage is not believed when it says more than the provider could have billed: prompt or
completion tokens over the model's context window (`Model.context_tokens`; a provider's
own `max_tokens` is no bound, as some bill a reasoning model's thinking beyond it). Such an
answer is charged the most the call could have cost: each count cut to the window, none of
the prompt taken as cached. So one answer claiming 2⁶³ tokens costs a context window of
prompt plus one of completion (Kimi K2 Thinking: $0.81), not $10¹⁴; the counters stay sane.

An answer with no countable usage (none, or only junk) costs what nobody can tell: `None`
here; the client then charges the spend window what it held for the call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from stream.catalog import Model
from stream.prices import token_counts
from stream.providers.attempts import Run
from stream.providers.completion import Usage

__all__ = ["Charge", "Problem", "Tab", "UsageWarnings", "charge"]

logger = logging.getLogger(__name__)

Problem = Literal["missing", "implausible"]


class Charge(NamedTuple):
    usage: Usage | None  # what is counted: as given, or cut to the bound when not believed
    cost_usd: float | None  # None: no price, or no usage to price
    problem: Problem | None


def charge(model: Model, usage: Usage | None) -> Charge:
    counts = token_counts(usage)
    if counts is None:
        return Charge(usage, None, "missing")
    bound = model.context_tokens
    problem: Problem | None = None
    if counts.prompt > bound or counts.completion > bound:
        completion = min(counts.completion, bound)
        usage = {
            "prompt_tokens": min(counts.prompt, bound),
            "completion_tokens": completion,
            "completion_tokens_details": {"reasoning_tokens": min(counts.reasoning, completion)},
        }
        problem = "implausible"
    cost = model.price.cost(usage) if model.price is not None else None
    return Charge(usage, cost, problem)


@dataclass
class Tab(Run):
    """`Run` (what one call was billed across its attempts), and the answers billed whose
    cost nobody can tell (no usage to price, on a priced model)."""

    unpriced: int = 0

    @property
    def reported_usd(self) -> float | None:
        """The cost a result carries: None when part of it is unknown."""
        return None if self.unpriced else self.cost_usd

    def failed_usd(self, priced: bool) -> float | None:
        """The cost a failure carries: 0 when no attempt was answered (nothing billed) on
        a priced model, so None says "billed, for an amount nobody can tell" alone (the
        fallback stage adds it into its result's cost, or makes that unknown too)."""
        if self.cost_usd is None and priced and not self.unpriced and self.answered == 0:
            return 0.0
        return self.reported_usd

    def spent(self, held: float) -> float:
        """What the spend window is charged: what was priced, and what was held for the
        call for each answer that could not be (and for a request cancelled while out,
        which the provider may bill and nobody will say for how much)."""
        return (self.cost_usd or 0.0) + held * (self.unpriced + self.sending)


class UsageWarnings:
    """One WARNING per model and problem (a provider that never reports usage would
    otherwise log on every answer); the metric counts every one."""

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._told: set[tuple[str, Problem]] = set()

    def warn(self, model: Model, problem: Problem, usage: Usage | None, cost: float | None) -> None:
        if (model.id, problem) in self._told:
            return
        self._told.add((model.id, problem))
        if problem == "implausible":
            logger.warning(
                "%s %s billed usage it could not have (%s; the context is %d tokens): "
                "charged at that bound, $%.6f; said once per model, counted in "
                "stream_provider_usage_problems_total",
                self._provider,
                model.api_model,
                _counts(usage),
                model.context_tokens,
                cost or 0.0,
            )
        else:
            logger.warning(
                "%s %s answered without usage: the spend limit counts what was held for "
                "the call, its cost_usd is null; said once per model, counted in "
                "stream_provider_usage_problems_total",
                self._provider,
                model.api_model,
            )


def _counts(usage: Any) -> str:
    """The token counts a usage claimed, for a log line (numbers only, never text)."""
    fields = ("prompt_tokens", "completion_tokens")
    return ", ".join(f"{key} {usage.get(key)}" for key in fields if isinstance(usage, dict))
