"""Time as a parameter: the provider client reads both of its clocks from one `Clock`, so
its tests move time instead of waiting on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Clock"]


@dataclass(frozen=True)
class Clock:
    """`monotonic` for intervals (budgets, cool-downs, pauses); `wall` for epoch times
    (request deadlines, the HTTP-date form of Retry-After)."""

    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
