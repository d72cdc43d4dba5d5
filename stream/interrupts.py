"""Ctrl-C for the CLI's long runs: a signal that cancels, and keeps cancelling.

`asyncio.run` turns Ctrl-C into one cancellation of the main task, and one can be lost:
caught in a client's shielded close, or in Python 3.11's `wait_for` when the awaited future
finishes at the same moment. The run then goes on as if nothing happened. That was seen in
the suite: an interrupted replay printed "done" and exited 0; a `stream lag --watch` of a
Kafka that was down kept watching. Here SIGINT and SIGTERM cancel an anyio scope instead,
which stays cancelled until the run has left it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["cancelled_by_signal"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def cancelled_by_signal(run: Callable[[], Awaitable[None]]) -> bool:
    """Await `run()`; True when SIGINT or SIGTERM cut it short (its clean-up ran)."""
    loop = asyncio.get_running_loop()
    with anyio.CancelScope() as scope:
        for signum in _SIGNALS:
            loop.add_signal_handler(signum, scope.cancel)
        try:
            await run()
        finally:
            for signum in _SIGNALS:
                loop.remove_signal_handler(signum)
    return scope.cancelled_caught
