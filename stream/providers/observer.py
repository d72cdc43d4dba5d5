"""The seams of a provider client, declared here beside their caller:

- `ProviderObserver`: where the client reports what it does (`stream.observe.metrics.Metrics`
  implements it);
- `SpendGate`: what a call waits on before it may spend money (`stream.spend.SpendBudget`
  implements it), and the `Hold` it settles with what the call cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from stream.catalog import Model

__all__ = ["Hold", "ProviderObserver", "SpendGate"]


class ProviderObserver(Protocol):
    """What the provider client calls; every method must be cheap and must not raise."""

    def on_attempt(self, provider: str, model: str, status_class: str, seconds: float) -> None: ...

    def on_retry(self, provider: str, model: str, error_type: str) -> None: ...

    def on_breaker(self, provider: str, model: str, state: str) -> None: ...

    def on_answer(
        self,
        provider: str,
        model: str,
        finish_reason: str | None,
        usage: Mapping[str, Any] | None,
        cost_usd: float | None,
    ) -> None:
        """A 200 the provider billed (also one the client could not use and tried again);
        `usage` as counted (cut to the model's context when it was not believed)."""

    def on_usage_problem(self, provider: str, model: str, problem: str) -> None:
        """A billed answer whose usage was `missing` (nothing countable: its cost is not
        known) or `implausible` (more than the model's context: charged at that bound)."""


class Hold(Protocol):
    """Money set aside for one call; settled once, with what the call really cost (None:
    unknown, as when it was cancelled with a request out; the estimate then counts)."""

    @property
    def estimate(self) -> float:
        """What was held: charged for an answer whose cost nobody can tell."""
        ...

    def settle(self, cost_usd: float | None) -> None: ...


class SpendGate(Protocol):
    async def admit(self, model: Model, body_bytes: int, max_tokens: int | None) -> Hold:
        """Wait until the call may spend (its estimated cost fits the limit), then hold
        that estimate. Callers bound the wait with their own deadline."""
        ...
