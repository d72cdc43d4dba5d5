"""Running an engine until SIGTERM or SIGINT: the first drains, the second stops at once."""

from __future__ import annotations

import logging
import signal

import anyio

from stream.engine.engine import Engine

__all__ = ["run_until_signal"]

log = logging.getLogger(__name__)


async def run_until_signal(engine: Engine) -> None:
    """Run `engine`; SIGTERM/SIGINT stops it gracefully, a second one cancels it at once."""
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if engine.stopping:
                        log.warning("second signal %d: stopping now", signum)
                        group.cancel_scope.cancel()
                        return
                    log.info("signal %d: draining (up to the shutdown grace)", signum)
                    engine.stop()

        group.start_soon(watch)
        await engine.run()
        group.cancel_scope.cancel()
