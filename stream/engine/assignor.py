"""Which member of a consumer group gets which partition: balanced per topic, sticky, and
the busiest partitions stay where their calls are running.

aiokafka speaks only the eager protocol: every membership change revokes every partition
of every member. What it costs depends on where partitions land afterwards, since a
partition that moves abandons the calls running on it (the new owner pays for them again)
unless it is handed over (below).
`assign` decides, given what each member owns now and how many calls run on each:

- **every partition once**, to a member subscribed to its topic;
- **balanced per topic**: among the members subscribed to a topic, partition counts differ
  by at most one (where a topic leaves a choice, the extra partitions go to the members
  with the fewest partitions so far, so totals stay even too);
- **sticky**: a member keeps as many of its partitions as its share allows, so only the
  fewest possible partitions move, and those it gives up are the ones with the fewest
  running calls (among idle ones, those it has handed over: it paused them to give them up);
- **no call abandoned** (`settle`): a partition that balance moves while calls run on it
  stays with its owner this round, marked to be **handed over**. The owner starts nothing
  new on it, lets the running calls finish (as long as a drain would wait), commits, and
  asks the group to rebalance; it then claims the partition with no calls running and it
  moves for free. Scaling out costs the newcomer a wait of at most one call, instead of
  every running call on the partitions it takes paid for twice.

Each member sends what it owns in its JoinGroup user data (`encode_claims`): a restarted
member owns nothing, and a member that was dropped from the group may claim partitions
someone else took since; the claim from the later generation wins.

aiokafka's own `StickyPartitionAssignor` (ported from kafka-python) is not used: it balances
total counts rather than each topic (scaling the primary stage from 1 to 2 workers gave one
worker all six live partitions and the other all six backfill ones), keeps its state in
class attributes (the two engines of `stream run all` would share it), and aiokafka never
tells it the generation, so conflicting claims cannot be told apart.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import orjson
from aiokafka import TopicPartition
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

__all__ = [
    "Claims",
    "Decision",
    "Member",
    "StickyAssignor",
    "assign",
    "decode_claims",
    "decode_handover",
    "encode_claims",
    "settle",
]

log = logging.getLogger(__name__)

_VERSION = 1

_V = TypeVar("_V")


@dataclass(frozen=True, kw_only=True)
class Claims:
    """What a member owns: partition → calls running on it, the generation in which the
    group gave it those partitions (-1: none yet), and those of them it has handed over
    (`stream.engine.handover`)."""

    generation: int = -1
    owned: Mapping[TopicPartition, int] = field(default_factory=dict)
    handed: frozenset[TopicPartition] = frozenset()


@dataclass(frozen=True, kw_only=True)
class Member:
    topics: frozenset[str]
    claims: Claims = field(default_factory=Claims)


@dataclass(frozen=True, kw_only=True)
class Decision:
    """Partitions per member this round, and those of them each member is to hand over."""

    assigned: dict[str, set[TopicPartition]]
    handover: dict[str, set[TopicPartition]]


def encode_claims(claims: Claims) -> bytes:
    body: dict[str, object] = {
        "v": _VERSION,
        "g": claims.generation,
        "o": dict(_by_topic(claims.owned.items())),
    }
    if claims.handed:  # a member that does not know "h" reads the rest as before
        body["h"] = dict(_partitions_by_topic(set(claims.handed)))
    return orjson.dumps(body)


def decode_claims(data: bytes) -> Claims:
    """The claims in a member's user data; none for anything we did not write (another
    assignor's data, an older or newer version, garbage): that only costs stickiness."""
    try:
        body = orjson.loads(data) if data else None
        if not isinstance(body, dict) or body.get("v") != _VERSION:
            return Claims()
        generation, topics = body["g"], body["o"]
        owned = {
            TopicPartition(topic, partition): running
            for topic, pairs in topics.items()
            for partition, running in pairs
            if _at_least(partition, 0) and _at_least(running, 0)
        }
        handed = frozenset(_partitions(body.get("h", {}))) & owned.keys()
        if not _at_least(generation, -1):
            return Claims()
        return Claims(generation=generation, owned=owned, handed=handed)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return Claims()


def _encode_handover(tps: set[TopicPartition]) -> bytes:
    return orjson.dumps({"v": _VERSION, "h": dict(_partitions_by_topic(tps))}) if tps else b""


def decode_handover(data: bytes) -> set[TopicPartition]:
    """The partitions an assignment's user data says to hand over; none for anything else
    (an older leader sends none: its moves abandon the running calls, as before)."""
    try:
        body = orjson.loads(data) if data else None
        if not isinstance(body, dict) or body.get("v") != _VERSION:
            return set()
        return _partitions(body["h"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return set()


def _partitions(by_topic: Mapping[str, Iterable[object]]) -> set[TopicPartition]:
    """The partitions in a topic → partition numbers map off the wire (the sane ones)."""
    return {
        TopicPartition(topic, partition)
        for topic, partitions in by_topic.items()
        for partition in partitions
        if isinstance(topic, str) and _at_least(partition, 0)
    }


def _at_least(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def assign(
    partitions: Mapping[str, int], members: Mapping[str, Member]
) -> dict[str, set[TopicPartition]]:
    """Partitions per member; `partitions` is the partition count of each topic."""
    return _balanced(partitions, members)[0]


def settle(partitions: Mapping[str, int], members: Mapping[str, Member]) -> Decision:
    """`assign`'s balanced assignment, except that a partition it would move while calls
    run on it stays with its owner, marked to be handed over (module docstring)."""
    target, owners = _balanced(partitions, members)
    assigned = {member: set(got) for member, got in target.items()}
    taker = {tp: member for member, got in target.items() for tp in got}
    handover: dict[str, set[TopicPartition]] = {member: set() for member in members}
    for tp, (owner, running) in owners.items():
        if running and taker[tp] != owner:
            assigned[taker[tp]].discard(tp)
            assigned[owner].add(tp)
            handover[owner].add(tp)
    return Decision(assigned=assigned, handover=handover)


def _balanced(
    partitions: Mapping[str, int], members: Mapping[str, Member]
) -> tuple[dict[str, set[TopicPartition]], dict[TopicPartition, tuple[str, int]]]:
    """`assign`'s result, and the owner each claimed partition had (`_owners`)."""
    result: dict[str, set[TopicPartition]] = {member: set() for member in members}
    owners: dict[TopicPartition, tuple[str, int]] = {}
    totals: Counter[str] = Counter()
    for topic in sorted(partitions):
        eligible = sorted(m for m, member in members.items() if topic in member.topics)
        if not eligible:
            continue
        tps = [TopicPartition(topic, p) for p in range(partitions[topic])]
        claimed = _owners(tps, {m: members[m].claims for m in eligible})
        owners.update(claimed)
        handed = {tp for tp, (m, _) in claimed.items() if tp in members[m].claims.handed}
        for member, got in _assign_topic(tps, eligible, claimed, handed, totals).items():
            result[member] |= got
            totals[member] += len(got)
    return result, owners


def _owners(
    tps: list[TopicPartition], claims: Mapping[str, Claims]
) -> dict[TopicPartition, tuple[str, int]]:
    """The owner of each claimed partition, and its running calls. Two claims on one
    partition: the later generation wins, then the busier one, then the lower id."""
    owners: dict[TopicPartition, tuple[str, int]] = {}
    ranks: dict[TopicPartition, tuple[int, int]] = {}
    wanted = set(tps)
    for member in sorted(claims):
        generation = claims[member].generation
        for tp, running in claims[member].owned.items():
            if tp in wanted and (tp not in ranks or (generation, running) > ranks[tp]):
                ranks[tp] = (generation, running)
                owners[tp] = (member, running)
    return owners


def _assign_topic(
    tps: list[TopicPartition],
    eligible: list[str],
    owners: Mapping[TopicPartition, tuple[str, int]],
    handed: set[TopicPartition],
    totals: Counter[str],
) -> dict[str, set[TopicPartition]]:
    owned: dict[str, list[tuple[int, TopicPartition]]] = {m: [] for m in eligible}
    for tp, (member, running) in owners.items():
        owned[member].append((running, tp))
    for heaviest_first in owned.values():
        # kept first: the busiest, then (idle alike) not handed over, then by number
        heaviest_first.sort(key=lambda item: (-item[0], item[1] in handed, item[1].partition))
    floor, extra = divmod(len(tps), len(eligible))

    def claim_on_extra(member: str) -> tuple[int, int, int, str]:
        # an extra slot keeps one more partition only for a member that owns more than
        # the floor: those first, the busiest such partition first; then the fewest so far
        mine = owned[member]
        keeps_one = len(mine) > floor
        return (0 if keeps_one else 1, -mine[floor][0] if keeps_one else 0, totals[member], member)

    quota = {m: floor for m in eligible}
    for member in sorted(eligible, key=claim_on_extra)[:extra]:
        quota[member] += 1
    got = {m: {tp for _, tp in owned[m][: quota[m]]} for m in eligible}
    kept = set().union(*got.values())
    free = iter(tp for tp in tps if tp not in kept)
    for member in eligible:
        while len(got[member]) < quota[member]:
            got[member].add(next(free))
    return got


class _Cluster(Protocol):
    def partitions_for_topic(self, topic: str) -> set[int] | None: ...


class StickyAssignor:
    """`assign` as an aiokafka partition assignor (duck-typed: aiokafka calls `name`,
    `metadata`, `assign` and `on_assignment`). `claims` says what this member owns at the
    moment it joins; one instance per engine, so engines never share state."""

    name = "stream-sticky"
    version = 0

    def __init__(
        self,
        claims: Callable[[], Claims],
        handover: Callable[[set[TopicPartition]], None] = lambda tps: None,
    ) -> None:
        """`handover` hears, with each assignment, the partitions to hand over (before
        aiokafka calls the rebalance listener with the assignment)."""
        self._claims = claims
        self._handover = handover

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(
            self.version, sorted(topics), encode_claims(self._claims())
        )

    def assign(
        self, cluster: _Cluster, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        subscribed = {
            m: Member(topics=frozenset(meta.subscription), claims=decode_claims(meta.user_data))
            for m, meta in members.items()
        }
        counts = {}
        for topic in set().union(*(m.topics for m in subscribed.values())):
            found = cluster.partitions_for_topic(topic)
            if found:
                counts[topic] = max(found) + 1
            else:
                log.warning("no partition metadata for topic %s: not assigned this round", topic)
        decided = settle(counts, subscribed)
        return {
            m: _assignment(self.version, decided.assigned[m], decided.handover[m]) for m in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        # the claims come from the engine's partitions; the assignment says what to hand over
        self._handover(decode_handover(assignment.user_data or b""))


def _assignment(
    version: int, tps: set[TopicPartition], handover: set[TopicPartition]
) -> ConsumerProtocolMemberAssignment:
    return ConsumerProtocolMemberAssignment(
        version, _partitions_by_topic(tps), _encode_handover(handover)
    )


def _partitions_by_topic(tps: set[TopicPartition]) -> list[tuple[str, list[int]]]:
    return [(topic, [p for p, _ in pairs]) for topic, pairs in _by_topic((tp, 0) for tp in tps)]


def _by_topic(items: Iterable[tuple[TopicPartition, _V]]) -> list[tuple[str, list[tuple[int, _V]]]]:
    """(partition, value) pairs grouped by topic, both in order: the wire's layout."""
    by_topic: dict[str, list[tuple[int, _V]]] = {}
    for tp, value in sorted(items, key=lambda item: item[0]):
        by_topic.setdefault(tp.topic, []).append((tp.partition, value))
    return sorted(by_topic.items())
