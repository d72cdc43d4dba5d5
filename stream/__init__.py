"""The prediction stream processor: LLM prediction requests from Kafka, run on Synthetic,
with a Together AI fallback stage and exactly one terminal record per request."""

from __future__ import annotations

from stream.config import Settings
from stream.errors import (
    BrokerError,
    CircuitOpenError,
    ConfigError,
    FatalProviderError,
    InvalidRecordError,
    KafkaError,
    ProviderError,
    RetryableProviderError,
    StreamError,
    TopicSpecError,
)

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "CircuitOpenError",
    "ConfigError",
    "FatalProviderError",
    "InvalidRecordError",
    "KafkaError",
    "ProviderError",
    "RetryableProviderError",
    "Settings",
    "StreamError",
    "TopicSpecError",
    "__version__",
]
