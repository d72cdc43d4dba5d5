"""What to do after a failed provider call: retry or not, and how long to wait first.

Pure functions, so the whole policy is property-tested without a server:
`classify` turns a status (plus headers and the error code in the body) into a `Verdict`,
`retry_after` reads the server's advice, `backoff` is the fallback schedule.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import NamedTuple

__all__ = [
    "FATAL_STATUSES",
    "RETRYABLE_STATUSES",
    "Backoff",
    "Verdict",
    "classify",
    "retry_after",
    "status_class",
]

RETRYABLE_STATUSES: Mapping[int, str] = {
    408: "timeout",
    409: "conflict",
    425: "too_early",
    429: "rate_limited",
    500: "server_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
    524: "timeout",
    529: "overloaded",
}
FATAL_STATUSES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    402: "insufficient_quota",  # Together: the monthly spending limit is reached
    403: "forbidden",
    404: "not_found",
    413: "too_large",
    422: "unprocessable",
}
# Statuses that mean "this provider/model is unwell", as opposed to "your request is wrong"
# or "slow down" (429 is the limiter's business, not the breaker's).
_PROVIDER_FAULTS = frozenset({408, 500, 502, 503, 504, 524, 529})


class Verdict(NamedTuple):
    retryable: bool
    error_type: str
    # Whether the failure says something about the provider's health (breaker input).
    provider_fault: bool


def classify(
    status: int,
    headers: Mapping[str, str] | None = None,
    error_code: str | None = None,
    message: str = "",
) -> Verdict:
    """The verdict for a non-2xx HTTP status; `x-should-retry` overrides the table."""
    verdict = _by_status(status, error_code, message)
    override = (headers or {}).get("x-should-retry", "").strip().lower()
    if override in ("true", "false"):
        return verdict._replace(retryable=override == "true")
    return verdict


def _by_status(status: int, error_code: str | None, message: str) -> Verdict:
    if status == 429 and error_code == "insufficient_quota":
        # Out of credit (Together says so with a 402, in FATAL_STATUSES): waiting will not
        # help, and the request goes to the fallback.
        return Verdict(False, "insufficient_quota", False)
    if status in (400, 403, 413) and _context_length(error_code, message):
        # Together answers 403 when prompt + max_tokens exceed the model's context; OpenAI a
        # 400 with code context_length_exceeded. The same request fails the same way again.
        return Verdict(False, "context_length_exceeded", False)
    if status in RETRYABLE_STATUSES:
        return Verdict(True, RETRYABLE_STATUSES[status], status in _PROVIDER_FAULTS)
    if status in FATAL_STATUSES:
        return Verdict(False, FATAL_STATUSES[status], False)
    if status >= 500:
        return Verdict(True, "server_error", True)
    return Verdict(False, "client_error" if 400 <= status < 500 else "unexpected_status", False)


def status_class(status: int) -> str:
    """`2xx`, `4xx` … for metrics labels (bounded cardinality)."""
    return f"{status // 100}xx"


def _context_length(error_code: str | None, message: str) -> bool:
    text = message.lower()
    return error_code == "context_length_exceeded" or (
        "context length" in text or "context_length" in text or "context window" in text
    )


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds the server asked us to wait, or None when it did not say.

    Not capped: a wait that does not fit the request's deadline is the caller's to judge
    (it fails over at once instead of sleeping a shortened wait and being refused again).
    `now` is epoch seconds, for the HTTP-date form of `retry-after`.
    """
    seconds = _number(headers.get("retry-after-ms"))
    if seconds is not None:
        seconds /= 1000.0
    else:
        raw = headers.get("retry-after")
        seconds = _number(raw)
        if seconds is None and raw:
            seconds = _http_date(raw, now)
    if seconds is None or seconds < 0:
        return None
    return seconds


def _number(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value == value and value != float("inf") else None


def _http_date(raw: str, now: float) -> float | None:
    try:
        moment = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now)


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits U(0, min(cap, base·2ⁿ⁻¹)).

    Full jitter spreads a herd of callers that failed together (a 503 burst) instead of
    bringing them back in lock-step.
    """

    base_s: float = 0.5
    cap_s: float = 8.0

    def ceiling(self, attempt: int) -> float:
        # Exponent bounded so a large attempt number cannot overflow a float.
        return min(self.cap_s, self.base_s * 2.0 ** min(max(attempt - 1, 0), 60))

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.ceiling(attempt))
