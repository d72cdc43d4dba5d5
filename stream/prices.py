"""What a call costs: prices per model, in USD per million tokens, and the cost of a usage.

The defaults are the providers' list prices as read on `PRICES_READ_ON` (Synthetic's pricing
page, Together's serverless price list); prices change, so a catalog file overrides them per
model (`[models.ID.price]`, see `stream.catalog`). Synthetic lists no separate price for
cached input, so there it equals the input price. A model without a price costs nothing
here (`cost_usd` null): the spend limit refuses to start until every model has one.

The cost of one answer, from its `usage`:

    (prompt − cached) × input + cached × cached_input + completion × output, per 10⁶

`completion_tokens` already includes the reasoning tokens (`completion_tokens_details`
only breaks them out), so reasoning is paid at the output price, once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

__all__ = [
    "DEFAULT_PRICES",
    "PRICES_READ_ON",
    "Bill",
    "Price",
    "TokenCounts",
    "is_amount",
    "token_counts",
]

PRICES_READ_ON = "2026-11-30"


@dataclass(frozen=True, kw_only=True)
class Price:
    """USD per million tokens; `read_on` says when (or where) the figure was taken."""

    input: float
    output: float
    cached_input: float | None = None  # None: the same as `input`
    read_on: str = PRICES_READ_ON

    def cost(self, usage: Mapping[str, Any] | None) -> float | None:
        """USD for one answer's usage; None when the usage says nothing countable."""
        counts = token_counts(usage)
        if counts is None:
            return None
        cached_price = self.input if self.cached_input is None else self.cached_input
        fresh = counts.prompt - counts.cached
        total = fresh * self.input + counts.cached * cached_price + counts.completion * self.output
        return total / 1_000_000


class TokenCounts(NamedTuple):  # a tuple: metrics iterate it per answer
    prompt: int
    cached: int  # of `prompt`, read from the provider's cache
    completion: int
    reasoning: int  # of `completion`, spent thinking


def is_amount(value: object) -> TypeGuard[float]:
    """A sum of money a record or a file may carry: a finite number, not below zero."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf


def token_counts(usage: Mapping[str, Any] | None) -> TokenCounts | None:
    """The counts a usage object holds (OpenAI's shape), each bounded by its parent."""
    if not usage:
        return None
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    prompt, completion = prompt or 0, completion or 0
    cached = _detail(usage, "prompt_tokens_details", "cached_tokens")
    reasoning = _detail(usage, "completion_tokens_details", "reasoning_tokens")
    return TokenCounts(prompt, min(cached, prompt), completion, min(reasoning, completion))


def _int(value: object) -> int | None:
    if type(value) is int:  # most often; and not a bool
        return value if value >= 0 else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _detail(usage: Mapping[str, Any], group: str, name: str) -> int:
    details = usage.get(group)
    # a dict (as parsed JSON is) passes without the slower ABC check
    if type(details) is dict or isinstance(details, Mapping):
        return _int(details.get(name)) or 0
    return 0


def _p(input: float, output: float, cached: float | None = None) -> Price:
    return Price(input=input, output=output, cached_input=cached)


# Catalog id → list price. Synthetic: synthetic.new/pricing (always-on models) and the
# models.dev mirror of it; Together: its serverless price list (mirrored by models.dev).
# GLM-4.6, MiniMax-M2 and Qwen3-Coder had no Synthetic price we could read: set theirs in
# the catalog file before using a spend limit with them.
DEFAULT_PRICES: Mapping[str, Price] = {
    "deepseek-r1-0528-syn": _p(3.00, 8.00),
    "kimi-k2-thinking-syn": _p(0.60, 2.50),
    "deepseek-v3-0324-syn": _p(1.20, 1.20),
    "deepseek-v3.1-terminus-syn": _p(1.20, 1.20),
    "deepseek-r1": _p(3.00, 7.00),
    "kimi-k2-instruct": _p(1.00, 3.00),
}


@dataclass
class Bill:
    """Tokens and spend added up over many answers (the demo's and the bench's summaries)."""

    answers: int = 0
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    reasoning: int = 0
    usd: float = 0.0

    def add(self, usage: Mapping[str, Any] | None, cost_usd: float | None) -> None:
        self.answers += 1
        counts = token_counts(usage)
        if counts is not None:
            self.prompt += counts.prompt
            self.cached += counts.cached
            self.completion += counts.completion
            self.reasoning += counts.reasoning
        self.usd += cost_usd or 0.0

    def merge(self, other: Bill) -> None:
        self.answers += other.answers
        self.prompt += other.prompt
        self.cached += other.cached
        self.completion += other.completion
        self.reasoning += other.reasoning
        self.usd += other.usd

    def line(self) -> str:
        return (
            f"tokens: prompt {self.prompt:,} (cached {self.cached:,}), completion "
            f"{self.completion:,} (reasoning {self.reasoning:,}); spend ${self.usd:.4f} "
            f"over {self.answers:,} answers"
        )

    def figures(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt,
            "cached_tokens": self.cached,
            "completion_tokens": self.completion,
            "reasoning_tokens": self.reasoning,
            "spend_usd": round(self.usd, 6),
        }
