"""Saying when Kafka takes none of a partition's outputs.

The idempotent producer retries a batch Kafka refuses (no leader, fewer in-sync replicas
than `min.insync.replicas`) for ever, and tells only through that batch's future; an
exactly-once commit waits the same way. An ack or a commit later than `LATE_S` marks the
partition (its `write_error`, which the engine's `problem()`, and so readiness, shows) and
logs it, once, until its outputs go through again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from stream.engine.partitions import Partition

__all__ = ["LATE_S", "acknowledged", "watched"]

log = logging.getLogger(__name__)

LATE_S = 5.0  # an ack takes milliseconds, a commit well under a second


def _late(partition: Partition, why: str) -> None:
    if partition.write_error is None:
        partition.write_error = why
        log.error(
            "Kafka takes no outputs of %s (%s): its records stay unfinished and uncommitted "
            "until it does",
            partition.tp,
            why,
        )


async def acknowledged(future: Any, partition: Partition) -> None:
    """Wait for Kafka's ack of one output, saying so when it is late. The producer goes on
    retrying the same batch meanwhile: sending it again would write it twice.

    A timer handle per output, not `asyncio.wait` (a waiter future, a set and two
    callbacks per output: ~4 % of a worker's CPU per record); taken from the future's
    loop, which costs no `getpid` as asking for the running loop does."""
    if not future.done():
        timer = future.get_loop().call_later(LATE_S, _late_unless_done, future, partition)
        try:
            await future
        finally:
            timer.cancel()
    else:
        future.result()  # raises its error


def _late_unless_done(future: Any, partition: Partition) -> None:
    if not future.done():
        _late(partition, f"no acknowledgement in {LATE_S:g} s")


async def watched(step: Callable[[], Awaitable[None]], partition: Partition) -> None:
    """Run `step` (a transaction's commit), saying so when it is late; its error is raised
    as it is, not in an exception group."""
    finished = anyio.Event()
    error: Exception | None = None

    async def watch() -> None:
        with anyio.move_on_after(LATE_S):
            await finished.wait()
            return
        _late(partition, f"transaction not committed in {LATE_S:g} s")

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            await step()
        except Exception as exc:
            error = exc
        finally:
            finished.set()
    if error is not None:
        raise error
