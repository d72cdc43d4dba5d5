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


async def run_until_signal(target: Stoppable) -> bool:
    """Run `target`; the first SIGTERM/SIGINT stops it gracefully, a second one at once
    (what is not committed runs again later). False when it was stopped at once: a
    supervisor must be able to tell that from a drain that finished."""
    forced = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(_watch_signals, target, group.cancel_scope, forced)
        await target.run()
        group.cancel_scope.cancel()
    return not forced.is_set()


async def _watch_signals(target: Stoppable, scope: anyio.CancelScope, forced: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        received = 0
        async for signum in signals:
            received += 1
            if received == 1:
                log.info("%s: draining in-flight work, then exiting", signal.Signals(signum).name)
                target.stop()
            else:
                log.warning("second signal: exiting without draining")
                forced.set()
                scope.cancel()
                return
