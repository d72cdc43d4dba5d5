"""The chaos run's cluster faults and its progress clock (see tests/chaos.py).

With `--brokers 3` the run works on a local three-broker cluster (replication 3,
min.insync.replicas 2) and kills brokers on purpose: the leader of a chosen partition of the
requests, results, fallback and dead-letter topics in turn, with SIGKILL, and once the
active controller; each comes back after `--broker-down` seconds, so at most one process is
down at a time and every write can still reach two in-sync replicas.

`Progress` keeps the time of every terminal record that arrives and of every fault, and
`longest_gaps` says, per fault, the longest time without a terminal record that was under
way within seconds of it: what a fault costs in stalled output.
"""

from __future__ import annotations

import bisect
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from aiokafka import TopicPartition

from stream.config import Settings
from stream.devtools.cluster import ClusterNode, LocalCluster, describe_partitions

WITHIN_S = 5.0  # a stall under way this long after a fault counts for it
# The topics whose leaders are killed, in turn (their partition changes each round).
TARGETS = ("predictions.requests", "predictions.results", "predictions.fallback")


@dataclass
class Progress:
    """When terminal records arrived and faults happened (monotonic seconds)."""

    started: float = field(default_factory=time.monotonic)
    arrivals: list[float] = field(default_factory=list)
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (at, kind, what)

    def arrived(self, count: int) -> None:
        now = time.monotonic()
        self.arrivals.extend([now] * count)

    def event(self, kind: str, what: str) -> None:
        self.events.append((time.monotonic(), kind, what))

    def report(self, end: float) -> list[dict[str, Any]]:
        gaps = longest_gaps(self.arrivals, [at for at, _, _ in self.events], end)
        return [
            {
                "at_s": round(at - self.started, 1),
                "kind": kind,
                "event": what,
                "gap_s": round(gap, 1),
            }
            for (at, kind, what), gap in zip(self.events, gaps, strict=True)
        ]

    def longest_by_kind(self, end: float) -> dict[str, float]:
        """The longest time without a terminal record after each kind of fault."""
        longest: dict[str, float] = {}
        for row in self.report(end):
            longest[row["kind"]] = max(longest.get(row["kind"], 0.0), row["gap_s"])
        return longest


def longest_gaps(
    arrivals: Sequence[float], events: Sequence[float], end: float, within: float = WITHIN_S
) -> list[float]:
    """For each event, the longest stretch without an arrival (the last one: until `end`)
    that was under way at some moment from the event to `within` seconds after it, counted
    from the event on: a fault stalls the output at once, if at all. Faults close together
    share a stall."""
    bounds = [-math.inf, *sorted(arrivals)]
    bounds.append(max(end, bounds[-1]))
    longest = []
    for at in events:
        k = max(0, bisect.bisect_right(bounds, at) - 1)  # the stretch `at` falls in
        stall = 0.0
        while k + 1 < len(bounds) and bounds[k] <= at + within:
            stall = max(stall, bounds[k + 1] - max(bounds[k], at))
            k += 1
        longest.append(stall)
    return longest


def broker_schedule(span: float, kills: int) -> list[tuple[float, str]]:
    """Broker kills spread over the run (the active controller's in the middle)."""
    actions = []
    for k in range(kills):
        at = span * (0.15 + 0.7 * k / max(1, kills - 1))
        target = "controller" if kills > 2 and k == kills // 2 else TARGETS[k % len(TARGETS)]
        actions.append((at, f"kill leader {target} {k % 3}"))
    return actions


@dataclass
class BrokerFaults:
    """Kills the chosen leaders of a `LocalCluster` and brings them back."""

    cluster: LocalCluster
    settings: Settings
    down_s: float
    broker_kills: int = 0
    controller_kills: int = 0
    # Held from a kill until the node is back and every replica in sync again: one
    # process down at a time.
    _one_down: anyio.Lock = field(default_factory=anyio.Lock)

    async def act(self, action: str, note: Callable[[str, str], None]) -> None:
        """Kill the leader (or the active controller) `action` names, bring it back
        `down_s` later, and wait until every replica is in sync again; `note` hears each
        step's kind and what it did."""
        async with self._one_down:
            node, what = await self._choose(action)
            await anyio.to_thread.run_sync(
                functools.partial(self.cluster.stop_node, node, kill=True)
            )
            note(f"{node.role} kill", f"kill {node.name} ({what})")
            await anyio.sleep(self.down_s)
            await anyio.to_thread.run_sync(self.cluster.start_node, node)
            note(f"{node.role} back", f"{node.name} back")
            await self._in_sync()

    async def _choose(self, action: str) -> tuple[ClusterNode, str]:
        _, _, target, partition = action.split()
        if target == "controller":
            self.controller_kills += 1
            return await anyio.to_thread.run_sync(self.cluster.quorum_leader), "the active one"
        topic = self.settings.topic(target)
        tp = TopicPartition(topic, int(partition))
        leader = (await describe_partitions(self.settings.kafka, [topic]))[tp].leader
        self.broker_kills += 1
        return self.cluster.broker(leader), f"leader of {target}[{partition}]"

    async def _in_sync(self, timeout_s: float = 60.0) -> None:
        """Until every partition of the run's topics has all its replicas in sync."""
        names = [self.settings.topic(t) for t in (*TARGETS, "predictions.dead-letter")]
        with anyio.move_on_after(timeout_s):
            while True:
                states = await describe_partitions(self.settings.kafka, names)
                if all(len(s.isr) == len(s.replicas) for s in states.values()):
                    return
                await anyio.sleep(0.5)  # polling Kafka's metadata: nothing to wait on
