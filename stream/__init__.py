"""The prediction stream processor: LLM prediction requests from Kafka, run on Synthetic,
with a Together AI fallback stage and exactly one terminal record per request."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


# Loaded when first asked for: importing the package (as every `stream` command does before
# its own code runs) must be quick, so that a Ctrl-C right after launch reaches the CLI's
# handler rather than interrupting an import (settings load pydantic, ~60 ms).
_ERRORS = [name for name in __all__ if name.endswith("Error")]
_LAZY = {"Settings": "stream.config", **dict.fromkeys(_ERRORS, "stream.errors")}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stream' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
