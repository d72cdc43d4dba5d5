"""Handing partitions over without abandoning their calls.

When balance moves a partition on which calls are running (a worker joins), the group's
leader leaves it with its owner for the round and marks it to be handed over
(`stream.engine.assignor.settle`). The owner then:

- starts nothing new on it (`Partition.handing_over`; flow control pauses its fetching),
  while its running records finish, write and are committed as usual;
- gives back the records whose calls still wait to go out (for a slot under the model's
  concurrency limit, the spend limit, a back-off: `stream.release`): unpaid, they go back
  to its queue and move with it, so the handover waits only for calls that are out;
- once none runs, or after the drain's grace (`STREAM_SHUTDOWN_GRACE_S`: a call that
  outlives it is abandoned, as a move always did), claims it with nothing running
  (`Partition.handed`) and asks the group to rebalance; the leader then moves it for free.

A rebalance in between decides afresh: each assignment says again what to hand over, and
ends the wait the previous one began.
A worker that stops meanwhile drains as usual and asks for nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import anyio
from aiokafka import TopicPartition

from stream.engine.assignor import Claims
from stream.engine.membership import Membership
from stream.engine.partitions import Partition
from stream.engine.rebalance import partition_names
from stream.release import Release

__all__ = ["Handover"]

log = logging.getLogger(__name__)


class Handover:
    """One engine's partitions to hand over, and the task that hands them over."""

    def __init__(
        self,
        partitions: Mapping[TopicPartition, Partition],
        membership: Membership,
        grace_s: Callable[[], float],
    ) -> None:
        self._partitions = partitions  # the engine's, shared
        self._membership = membership
        self._grace_s = grace_s
        self._asked: set[TopicPartition] = set()
        self._due = anyio.Event()
        self._waiting: anyio.CancelScope | None = None  # the wait for running records

    def heard(self, tps: set[TopicPartition]) -> None:
        """What the assignment asks (the assignor hears it before the rebalance listener
        sets the partitions up)."""
        self._asked = set(tps)

    def assigned(self) -> None:
        """The assignment is set up: mark what it asks to hand over, clear the rest."""
        for tp, partition in self._partitions.items():
            partition.handing_over = tp in self._asked
            partition.handed = False
            if partition.release.asked and not partition.handing_over:
                partition.release = Release()  # it stays: what it gave back runs here
        if self._waiting is not None:
            self._waiting.cancel()  # the group decided again: that wait is over
        if self._asked & self._partitions.keys():
            self._due.set()

    def claims(self) -> Claims:
        """What this member owns as it joins: partitions, and the records running on each
        (none on one handed over: it is free to move)."""
        owned = {
            tp: 0 if p.handed else p.in_flight
            for tp, p in self._partitions.items()
            if not p.abandoned
        }
        handed = frozenset(tp for tp in owned if self._partitions[tp].handed)
        return Claims(generation=self._membership.generation, owned=owned, handed=handed)

    async def run(self, stopping: anyio.Event) -> None:
        while True:
            await self._due.wait()
            self._due = anyio.Event()
            generation = self._membership.generation
            leaving = [p for p in self._partitions.values() if p.handing_over]
            if not leaving or stopping.is_set():
                continue  # a drain hands everything back anyway
            # Calls waiting to go out end now: their records go back to the queue.
            waiting = sum(p.release.ask() for p in leaving)
            running, grace = sum(p.in_flight for p in leaving), self._grace_s()
            log.info(
                "handing %d partitions over to another member once their %d running records "
                "finish (up to %.0f s; %d whose calls had not gone out are given back, "
                "unpaid); nothing new starts on them",
                len(leaving),
                running - waiting,
                grace,
                waiting,
                extra={"partitions": partition_names(p.tp for p in leaving)},
            )
            with anyio.move_on_after(grace) as self._waiting:
                for partition in leaving:
                    while partition.in_flight and not partition.abandoned:
                        await partition.idle.wait()
            self._waiting = None
            if stopping.is_set() or self._membership.generation != generation:
                continue  # draining, or the group decided again meanwhile
            for partition in leaving:
                partition.handed = True
            late = sum(p.in_flight for p in leaving)
            log.info(
                "partitions ready to hand over (%d records still running are abandoned "
                "when they move): asking the group to rebalance",
                late,
                extra={"partitions": partition_names(p.tp for p in leaving)},
            )
            self._membership.rejoin()
