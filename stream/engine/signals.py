"""Running until SIGTERM or SIGINT: the first drains, the second stops at once."""

from __future__ import annotations

import logging
import signal
from typing import Protocol

import anyio

__all__ = ["Stoppable", "run_until_signal"]

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    """An engine, or a worker of engines."""

    async def run(self) -> None: ...

    def stop(self) -> None:
        """Graceful: no new work, drain, commit, close."""


async def run_until_signal(target: Stoppable) -> None:
    """Run `target`; the first SIGTERM/SIGINT stops it gracefully, a second one at once
    (what is not committed runs again later)."""
    async with anyio.create_task_group() as group:
        group.start_soon(_watch_signals, target, group.cancel_scope)
        await target.run()
        group.cancel_scope.cancel()


async def _watch_signals(target: Stoppable, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        received = 0
        async for signum in signals:
            received += 1
            if received == 1:
                log.info("%s: draining in-flight work, then exiting", signal.Signals(signum).name)
                target.stop()
            else:
                log.warning("second signal: exiting without draining")
                scope.cancel()
                return
