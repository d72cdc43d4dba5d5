"""Running until SIGTERM or SIGINT: the first drains, the second stops at once; and the
drain itself (`drain`): running calls finish, calls that wait give their records back."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Mapping
from typing import Protocol

import anyio
from aiokafka import TopicPartition

from stream.engine.partitions import Partition
from stream.engine.rebalance import partition_names

__all__ = ["Stoppable", "drain", "run_until_signal"]

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


async def drain(
    partitions: Mapping[TopicPartition, Partition], grace_s: float, released: Callable[[], int]
) -> int:
    """Stop starting records but keep the partitions (and, with an instance id, keep them
    through the restart): running calls get `grace_s` to finish and be written; records
    whose calls still wait give themselves back (`released()` counts them). Returns how
    many were still running when the grace ran out (abandoned: cancelled, run again by
    their next owner)."""
    for partition in partitions.values():
        partition.drop_queued()
    running = sum(p.in_flight for p in partitions.values())
    log.info(
        "draining %d running records (up to %.0f s)",
        running,
        grace_s,
        extra={"partitions": partition_names(partitions), "draining": True},
    )
    try:
        with anyio.move_on_after(grace_s):
            for partition in list(partitions.values()):
                await partition.idle.wait()
    finally:  # a second signal cancels the wait: still say what was given back
        if given_back := released():
            log.info(
                "gave back %d records still waiting to call (for the spend limit, a slot, "
                "a pause or a back-off; none with an answer billed): uncommitted, their "
                "next owner runs them",
                given_back,
            )
    abandoned = sum(p.abandon() for p in partitions.values())
    if abandoned:
        log.warning("shutdown grace over: abandoned %d running records", abandoned)
    return abandoned
