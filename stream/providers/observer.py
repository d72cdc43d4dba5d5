"""Where a provider client reports what it does: the one seam between the client and the
metrics (`stream.observe.metrics.Metrics` implements it), declared here, beside its caller."""

from __future__ import annotations

from typing import Protocol

__all__ = ["ProviderObserver"]


class ProviderObserver(Protocol):
    """What the provider client calls; every method must be cheap and must not raise."""

    def on_attempt(self, provider: str, model: str, status_class: str, seconds: float) -> None: ...

    def on_retry(self, provider: str, model: str, error_type: str) -> None: ...

    def on_breaker(self, provider: str, model: str, state: str) -> None: ...
