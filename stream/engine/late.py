"""Saying when Kafka takes none of a partition's outputs (and when an engine is stuck).

The idempotent producer retries a batch Kafka refuses (no leader, fewer in-sync replicas
than `min.insync.replicas`) for ever, and tells only through that batch's future; an
exactly-once commit waits the same way. An ack or a commit later than `LATE_S` marks the
partition (its `write_error`, which the engine's `problem()`, and so readiness, shows) and
logs it, once, until its outputs go through again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio

from stream.engine.partitions import Partition

__all__ = ["LATE_S", "STALLED_WRITE_S", "acknowledged", "stuck_outputs", "watched"]

log = logging.getLogger(__name__)

LATE_S = 5.0  # an ack takes milliseconds, a commit well under a second
# Outputs Kafka has not acknowledged for this long mean the engine is stuck (not ready).
STALLED_WRITE_S = 10.0


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
    """Wait for Kafka's ack of a batch of outputs, saying so when it is late. The producer
    goes on retrying the same batch meanwhile: sending it again would write it twice.

    The partition keeps its awaited acks with when each wait began, and one timer looks
    at the oldest (a timer per output cost ~5 µs a record: the loop's heap of cancelled
    handles); the loop is the future's, which costs no `getpid` as asking for the running
    loop does."""
    if future.done():
        future.result()  # raises its error
        return
    loop = future.get_loop()
    # Writers of one batch share its future: the first wait is the oldest.
    partition.acks.setdefault(future, loop.time())
    if partition.late_watch is None:
        partition.late_watch = loop.call_later(LATE_S, _look, partition, loop)
    try:
        await future
    finally:
        partition.acks.pop(future, None)


def _look(partition: Partition, loop: Any) -> None:
    """The partition's timer: mark it late if its oldest awaited ack is; look again when
    the oldest could next be late, while any is awaited."""
    partition.late_watch = None
    if not partition.acks:
        return
    now, oldest = loop.time(), min(partition.acks.values())
    if now - oldest >= LATE_S:
        _late(partition, f"no acknowledgement in {LATE_S:g} s")
    due = oldest + LATE_S - now
    partition.late_watch = loop.call_later(due if due > 0 else LATE_S, _look, partition, loop)


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


def stuck_outputs(partitions: Iterable[Partition], now: float) -> str | None:
    """Why an engine is not making progress, if it is stuck: outputs Kafka has not taken
    for `STALLED_WRITE_S` (a broker down, too few in-sync replicas); `now` is monotonic."""
    stuck = {
        p.tp: (age, p.write_error)
        for p in partitions
        if (age := p.oldest_write_s(now)) is not None and age >= STALLED_WRITE_S
    }
    if not stuck:
        return None
    tp, (age, error) = max(stuck.items(), key=lambda item: item[1][0])
    because = f" (last error {error})" if error else ""
    return (
        f"outputs of {len(stuck)} partition(s) not taken by Kafka, the oldest of "
        f"{tp.topic}[{tp.partition}] for {age:.0f} s{because}"
    )
