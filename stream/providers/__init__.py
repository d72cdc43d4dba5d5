"""Calling LLM providers: one OpenAI-compatible client per provider, with retries inside a
deadline, a circuit breaker per model and adaptive concurrency.

    from stream.providers import ProviderClient

    async with ProviderClient(settings.synthetic) as synthetic:
        completion = await synthetic.complete(model, messages, params, deadline=deadline)
"""

from __future__ import annotations

from stream.providers.breaker import BreakerConfig, BreakerSnapshot, CircuitBreaker
from stream.providers.client import ProviderClient
from stream.providers.clock import Clock
from stream.providers.completion import Completion, split_reasoning
from stream.providers.limiter import AdaptiveLimiter, LimiterSnapshot
from stream.providers.observer import ProviderObserver
from stream.providers.retry import Backoff, Verdict, classify, retry_after

__all__ = [
    "AdaptiveLimiter",
    "Backoff",
    "BreakerConfig",
    "BreakerSnapshot",
    "CircuitBreaker",
    "Clock",
    "Completion",
    "LimiterSnapshot",
    "ProviderClient",
    "ProviderObserver",
    "Verdict",
    "classify",
    "retry_after",
    "split_reasoning",
]
