"""The exceptions this package raises, one tree under `StreamError`.

    StreamError
    ├── ConfigError              settings, catalog or topic files a person must fix
    │   ├── TopicSpecError       a file in topics/ is malformed
    │   └── UsageError           a command-line value the command cannot take (exit 2)
    ├── KafkaError               the cluster refused or could not be reached
    │   ├── BrokerError          the local broker could not be fetched or started
    │   └── FencedError          a newer process joined with this one's instance id
    ├── ProviderError            an LLM provider call failed (status, error_type, attempts)
    │   ├── RetryableProviderError   may succeed if tried again (429, 5xx, timeouts …)
    │   ├── FatalProviderError       will not succeed as sent (400, 401, 404 …)
    │   └── CircuitOpenError         not called: the breaker for that model is open
    ├── InvalidRecordError       an input record cannot become a request (→ dead letter)
    └── UndecodableRecordError   the Kafka client could not decode a fetched record

Foreign exceptions (aiokafka, httpx, OSError) are translated where they are caught,
with `raise Ours(...) from exc`, so retry and fallback code only ever catch our types.
The CLI prints a `StreamError` as one line and exits non-zero, without a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "EXIT_ATTENTION",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "BrokerError",
    "CircuitOpenError",
    "ConfigError",
    "FatalProviderError",
    "FencedError",
    "InvalidRecordError",
    "KafkaError",
    "ProviderError",
    "RecordReleased",
    "RetryableProviderError",
    "StreamError",
    "TopicSpecError",
    "UsageError",
    "UndecodableRecordError",
    "flag_value",
]


T = TypeVar("T")

# The `stream` command's exit codes: 0 done; 1 failed (one line on stderr says why and what
# to do); 2 usage error; 3 something needs a person (topic drift, a stalled consumer group).
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ATTENTION = 3


class StreamError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(StreamError):
    """A setting, catalog or file is wrong; the message says which and what to do."""


class TopicSpecError(ConfigError):
    """A topic declaration in topics/ is malformed."""


class UsageError(ConfigError):
    """A command-line value the command cannot take (--until before --since, --rate 0):
    exit 2, as argparse's own usage errors."""


def flag_value(check: Callable[..., T], *args: Any) -> T:
    """`check(*args)` on a command-line flag's value: a `ConfigError` it raises (as it
    does for the same value from the environment) is a usage error, exit 2."""
    try:
        return check(*args)
    except UsageError:
        raise
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


class KafkaError(StreamError):
    """Kafka could not be reached or refused a request."""


class BrokerError(KafkaError):
    """The local development broker could not be fetched, started or stopped."""


class FencedError(KafkaError):
    """Another process joined the consumer group with this worker's instance id and took
    its partitions over: this one stops (two workers must not share an id)."""


class OutputRejectedError(StreamError):
    """Kafka refused one of a record's outputs for good (too large for its topic): the
    record needs other outputs (a dead letter), not another try."""


class RecordReleased(StreamError):
    """A handler gives its record back during a shutdown drain, before anything a run
    would pay for again: the call still waited (the spend limit, a free slot, a pause the
    provider asked for, a back-off) and no answer was billed. The engine leaves the record
    unfinished and uncommitted, for the next owner of its partition, instead of holding
    the drain until the wait ends."""


class ProviderError(StreamError):
    """An LLM provider call failed.

    `status` is the HTTP status (None for transport errors), `error_type` a short stable
    word (`rate_limited`, `timeout`, `server_error`, `empty_content`, `content_filter`,
    `context_length_exceeded`, `insufficient_quota` …) that records carry.
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str,
        status: int | None = None,
        error_type: str = "error",
        attempts: int = 1,
        provider_request_id: str | None = None,
        cost_usd: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.model = model
        self.status = status
        self.error_type = error_type
        self.attempts = attempts
        # The provider's id for the last response, to quote to its support (None: no answer).
        self.provider_request_id = provider_request_id
        # What the failed attempts were billed (bad 200s are paid for), when known.
        self.cost_usd = cost_usd


class RetryableProviderError(ProviderError):
    """The call may succeed if tried again."""

    retryable = True


class FatalProviderError(ProviderError):
    """The call will not succeed as sent."""


class CircuitOpenError(ProviderError):
    """The breaker for this provider and model is open: the call was not made."""


class InvalidRecordError(StreamError):
    """An input record cannot become a request; `reason` is the dead-letter reason.

    `request` is the parsed request when there was one (an unknown model, a past
    deadline), so the dead letter can carry it for a later re-drive.
    """

    def __init__(self, reason: str, message: str, *, request: dict[str, Any] | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.request = request


class UndecodableRecordError(StreamError):
    """The Kafka client could not decode a fetched record (aiokafka reads header keys as
    UTF-8 and stops at one that is not). The engine steps over it and hands the stage's
    error path a stand-in that has only the record's position."""
