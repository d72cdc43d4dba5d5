"""A key refused (401) or not allowed (403): nothing else says so (the breaker takes no
side, the request fails over and is paid for there), so the client says it, once a
minute, naming the variable to check."""

from __future__ import annotations

import logging
import math

from stream.catalog import Model
from stream.providers.http import Failure

__all__ = ["RefusalLog"]

logger = logging.getLogger("stream.providers.client")

_AUTH_STATUSES = frozenset({401, 403})  # Together also answers 403 for a context too long
_LOG_INTERVAL_S = 60.0


class RefusalLog:
    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._logged_at = -math.inf  # when a refusal was last logged (monotonic)

    def heard(self, model: Model, failure: Failure, now: float) -> None:
        """An attempt failed with `failure` at `now` (monotonic): log it if it was a refusal
        and none was logged in the last minute."""
        if failure.status not in _AUTH_STATUSES or failure.error_type == "context_length_exceeded":
            return
        if now - self._logged_at < _LOG_INTERVAL_S:
            return
        self._logged_at = now
        logger.warning(
            "%s refused the call to %s: HTTP %d %s; check %s_API_KEY (and the account's "
            "access to the model): its requests fail over until then",
            self._provider,
            model.api_model,
            failure.status,
            failure.error_type,
            self._provider.upper(),
        )
