"""The sticky assignor: every partition once, balanced per topic, as few moves as balance
allows (the idlest partitions move), and what members send each other survives the wire."""

from __future__ import annotations

from collections import Counter

from aiokafka import TopicPartition
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from hypothesis import given
from hypothesis import strategies as st

from stream.engine.assignor import (
    Claims,
    Member,
    StickyAssignor,
    assign,
    decode_claims,
    decode_handover,
    encode_claims,
    settle,
)

TOPICS = ("requests", "backfill", "fallback")
NAMES = st.sampled_from([f"w{i}" for i in range(7)])


@st.composite
def groups(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, Member]]:
    """Topics with partition counts, and members with subscriptions and claims, including
    stale ones: partitions that no longer exist, or claimed by two members."""
    partitions = draw(st.dictionaries(st.sampled_from(TOPICS), st.integers(1, 12), min_size=1))
    names = draw(st.sets(NAMES, min_size=1, max_size=6))
    homogeneous = draw(st.booleans())
    members = {}
    for name in sorted(names):
        topics = (
            frozenset(partitions)
            if homogeneous
            else draw(st.frozensets(st.sampled_from(TOPICS), min_size=1))
        )
        claimable = [TopicPartition(t, p) for t in TOPICS for p in range(14)]
        owned = draw(st.dictionaries(st.sampled_from(claimable), st.integers(0, 50)))
        claims = Claims(generation=draw(st.integers(-1, 5)), owned=owned)
        members[name] = Member(topics=topics, claims=claims)
    return partitions, members


def _resolved_owner(
    tp: TopicPartition, partitions: dict[str, int], members: dict[str, Member]
) -> str | None:
    """Who owns `tp` going in: the subscribed claimant of the latest generation, then the
    busiest, then the lowest id."""
    if tp.partition >= partitions.get(tp.topic, 0):
        return None
    claimants = [
        (-m.claims.generation, -m.claims.owned[tp], name)
        for name, m in members.items()
        if tp in m.claims.owned and tp.topic in m.topics
    ]
    return min(claimants)[2] if claimants else None


@given(groups())
def test_every_partition_goes_to_exactly_one_subscribed_member(
    group: tuple[dict[str, int], dict[str, Member]],
) -> None:
    partitions, members = group
    result = assign(partitions, members)
    assert set(result) == set(members)
    handed = Counter(tp for got in result.values() for tp in got)
    subscribed = {t for m in members.values() for t in m.topics}
    expected = {
        TopicPartition(t, p) for t, n in partitions.items() if t in subscribed for p in range(n)
    }
    assert set(handed) == expected
    assert all(count == 1 for count in handed.values())
    for name, got in result.items():
        assert all(tp.topic in members[name].topics for tp in got)


@given(groups())
def test_each_topic_is_balanced_among_its_members(
    group: tuple[dict[str, int], dict[str, Member]],
) -> None:
    partitions, members = group
    result = assign(partitions, members)
    for topic in partitions:
        counts = [
            sum(tp.topic == topic for tp in result[name])
            for name, m in members.items()
            if topic in m.topics
        ]
        if counts:
            assert max(counts) - min(counts) <= 1, (topic, counts)


@given(groups())
def test_only_the_fewest_partitions_move_and_the_idlest_go(
    group: tuple[dict[str, int], dict[str, Member]],
) -> None:
    partitions, members = group
    result = assign(partitions, members)
    for topic, count in partitions.items():
        eligible = [name for name, m in members.items() if topic in m.topics]
        if not eligible:
            continue
        floor, extra = divmod(count, len(eligible))
        owned: dict[str, list[TopicPartition]] = {name: [] for name in eligible}
        for p in range(count):
            tp = TopicPartition(topic, p)
            if (owner := _resolved_owner(tp, partitions, members)) is not None:
                owned[owner].append(tp)
        moved = 0
        for name in eligible:
            mine = [tp for tp in result[name] if tp.topic == topic]
            kept = set(mine) & set(owned[name])
            assert len(kept) == min(len(owned[name]), len(mine))  # kept all it had room for
            weights = members[name].claims.owned
            given_up = set(owned[name]) - kept
            if kept and given_up:  # what moved away was no busier than what stayed
                assert max(weights[tp] for tp in given_up) <= min(weights[tp] for tp in kept)
            moved += len(given_up)
        # the least any balanced assignment moves: what is over floor + 1, and one from
        # each member over the floor beyond the `extra` who may keep floor + 1
        over = [len(tps) for tps in owned.values() if len(tps) > floor]
        least = sum(n - floor - 1 for n in over) + max(0, len(over) - extra)
        assert moved == least


@given(st.dictionaries(st.sampled_from(TOPICS), st.integers(1, 12), min_size=1), st.integers(1, 6))
def test_a_fresh_group_is_balanced_in_total_too(partitions: dict[str, int], size: int) -> None:
    members = {f"w{i}": Member(topics=frozenset(partitions)) for i in range(size)}
    totals = [len(got) for got in assign(partitions, members).values()]
    assert max(totals) - min(totals) <= 1


def _weights(tps: set[TopicPartition]) -> dict[TopicPartition, int]:
    return dict.fromkeys(tps, 1)


@given(groups(), st.lists(st.sets(NAMES, min_size=1, max_size=6), min_size=1, max_size=6))
def test_membership_changes_round_after_round(
    group: tuple[dict[str, int], dict[str, Member]], rounds: list[set[str]]
) -> None:
    """Members come and go; each round's claims are the last round's assignment. A round
    with the same members as the last moves nothing."""
    partitions, _ = group
    previous: dict[str, set[TopicPartition]] = {}
    for generation, names in enumerate(rounds):
        members = {
            name: Member(
                topics=frozenset(partitions),
                claims=Claims(generation=generation, owned=_weights(previous.get(name, set()))),
            )
            for name in names
        }
        result = assign(partitions, members)
        if set(previous) == names:
            assert result == previous
        previous = result


def test_scaling_the_primary_stage_out_gives_each_worker_live_partitions() -> None:
    partitions = {"requests": 6, "backfill": 6}
    alone = assign(partitions, {"a": Member(topics=frozenset(partitions))})
    busy = {tp: 100 if tp.partition < 3 else 1 for tp in alone["a"]}
    members = {
        "a": Member(topics=frozenset(partitions), claims=Claims(generation=1, owned=busy)),
        "b": Member(topics=frozenset(partitions)),
    }
    result = assign(partitions, members)
    for name in "ab":
        assert Counter(tp.topic for tp in result[name]) == {"requests": 3, "backfill": 3}
    # a keeps its busy partitions; the idle ones move
    assert {tp.partition for tp in result["a"]} == {0, 1, 2}


@given(groups())
def test_settle_moves_no_partition_with_running_calls_and_marks_what_balance_would_move(
    group: tuple[dict[str, int], dict[str, Member]],
) -> None:
    partitions, members = group
    target = assign(partitions, members)
    decision = settle(partitions, members)
    handed = Counter(tp for got in decision.assigned.values() for tp in got)
    assert set(handed) == {tp for got in target.values() for tp in got}  # the same partitions
    assert all(count == 1 for count in handed.values())  # each once
    for name, got in decision.assigned.items():
        assert all(tp.topic in members[name].topics for tp in got)
        assert decision.handover[name] <= got
    for tp in handed:
        owner = _resolved_owner(tp, partitions, members)
        if owner is None:
            continue
        running = members[owner].claims.owned[tp]
        moves = tp not in target[owner]
        # busy: stays with its owner, marked exactly when balance wants it elsewhere
        assert (tp in decision.assigned[owner]) == (bool(running) or not moves)
        assert (tp in decision.handover[owner]) == (bool(running) and moves)
    # nothing else differs from the balanced assignment
    for name in members:
        others = {tp for tp in target[name] if not any(tp in h for h in decision.handover.values())}
        assert decision.assigned[name] - decision.handover[name] == others


@given(groups())
def test_settle_without_running_calls_is_the_balanced_assignment(
    group: tuple[dict[str, int], dict[str, Member]],
) -> None:
    partitions, members = group
    idle = {
        name: Member(
            topics=m.topics,
            claims=Claims(generation=m.claims.generation, owned=dict.fromkeys(m.claims.owned, 0)),
        )
        for name, m in members.items()
    }
    decision = settle(partitions, idle)
    assert decision.assigned == assign(partitions, idle)
    assert not any(decision.handover.values())


def test_scaling_out_with_every_partition_busy_hands_over_then_balances() -> None:
    """1 → 2 workers while calls run on all six partitions: nothing moves this round and
    half is marked; once those are idle (claimed with 0 running) they move."""
    partitions = {"requests": 6}
    busy = {TopicPartition("requests", p): 10 + p for p in range(6)}
    members = {
        "a": Member(topics=frozenset(partitions), claims=Claims(generation=1, owned=busy)),
        "b": Member(topics=frozenset(partitions)),
    }
    first = settle(partitions, members)
    assert first.assigned == {"a": set(busy), "b": set()}
    assert {tp.partition for tp in first.handover["a"]} == {0, 1, 2}  # the idlest
    owned = {tp: 0 if tp in first.handover["a"] else n for tp, n in busy.items()}
    members["a"] = Member(topics=frozenset(partitions), claims=Claims(generation=2, owned=owned))
    second = settle(partitions, members)
    assert {tp.partition for tp in second.assigned["a"]} == {3, 4, 5}
    assert {tp.partition for tp in second.assigned["b"]} == {0, 1, 2}
    assert not any(second.handover.values())


def test_of_idle_partitions_the_handed_one_moves() -> None:
    """The member handed partition 0 over (paused it, its calls done) while partition 1 is
    idle by chance: 0 moves, not 1 (moving 1 would leave 0 paused for nothing)."""
    partitions = {"requests": 3}
    owned = {TopicPartition("requests", 0): 0, TopicPartition("requests", 1): 0}
    owned[TopicPartition("requests", 2)] = 7
    handed = frozenset({TopicPartition("requests", 0)})
    members = {
        "a": Member(topics=frozenset(partitions), claims=Claims(generation=2, owned=owned)),
        "b": Member(topics=frozenset(partitions)),
    }
    assert settle(partitions, members).assigned["b"] == {TopicPartition("requests", 1)}
    members["a"] = Member(
        topics=frozenset(partitions), claims=Claims(generation=2, owned=owned, handed=handed)
    )
    decided = settle(partitions, members)
    assert decided.assigned["b"] == set(handed)
    assert not any(decided.handover.values())


@given(st.binary())
def test_assignment_user_data_we_did_not_write_hands_over_nothing(data: bytes) -> None:
    assert isinstance(decode_handover(data), set)


@st.composite
def wire_claims(draw: st.DrawFn) -> Claims:
    owned = draw(
        st.dictionaries(
            st.builds(TopicPartition, st.sampled_from(TOPICS), st.integers(0, 10**4)),
            st.integers(0, 10**4),
        )
    )
    handed = draw(st.frozensets(st.sampled_from(sorted(owned)))) if owned else frozenset()
    return Claims(generation=draw(st.integers(-1, 10**6)), owned=owned, handed=handed)


@given(wire_claims())
def test_claims_survive_the_wire(claims: Claims) -> None:
    assert decode_claims(encode_claims(claims)) == claims


def test_claims_without_handed_partitions_read_as_before() -> None:
    """What an older member sends (no "h") still claims; "h" naming a partition the member
    does not own hands over nothing."""
    old = b'{"v":1,"g":4,"o":{"requests":[[0,3],[1,0]]}}'
    assert decode_claims(old) == Claims(
        generation=4, owned={TopicPartition("requests", 0): 3, TopicPartition("requests", 1): 0}
    )
    stray = b'{"v":1,"g":4,"o":{"requests":[[1,0]]},"h":{"requests":[1,5]}}'
    assert decode_claims(stray).handed == {TopicPartition("requests", 1)}


@given(st.binary())
def test_user_data_we_did_not_write_claims_nothing(data: bytes) -> None:
    decoded = decode_claims(data)
    assert isinstance(decoded, Claims)


def test_malformed_claims_claim_nothing() -> None:
    for data in (
        b'{"v": 2, "g": 1, "o": {}}',
        b'{"v": 1, "g": "x", "o": {}}',
        b'{"v": 1, "g": 1, "o": {"t": [[0]]}}',
        b'{"v": 1, "g": 1, "o": []}',
        b"[1, 2]",
    ):
        assert decode_claims(data) == Claims()
    negative = decode_claims(b'{"v": 1, "g": 1, "o": {"t": [[-1, 3], [2, 4]]}}')
    assert negative.owned == {TopicPartition("t", 2): 4}


class _Cluster:
    def __init__(self, partitions: dict[str, int]) -> None:
        self._partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        count = self._partitions.get(topic)
        return set(range(count)) if count else None


def test_the_aiokafka_face_round_trips_claims_and_assignments() -> None:
    """What aiokafka calls: `metadata` on each member, `assign` on the leader with the
    decoded metadata, and each member reads its partitions from the assignment."""
    owned = {TopicPartition("requests", 0): 5, TopicPartition("requests", 1): 2}
    a = StickyAssignor(lambda: Claims(generation=3, owned=owned))
    b = StickyAssignor(lambda: Claims())
    wire = {
        name: ConsumerProtocolMemberMetadata.decode(
            assignor.metadata(["requests", "gone"]).encode()
        )
        for name, assignor in (("a", a), ("b", b))
    }
    result = a.assign(_Cluster({"requests": 4}), wire)
    got = {name: set(assignment.partitions()) for name, assignment in result.items()}
    assert got["a"] == set(owned)
    assert got["b"] == {TopicPartition("requests", 2), TopicPartition("requests", 3)}


def test_the_aiokafka_face_tells_a_member_what_to_hand_over() -> None:
    """A leader's assignment carries the partitions to hand over in its user data, and
    the member's `on_assignment` hears them; a member with nothing to hand over hears so."""
    owned = {TopicPartition("requests", p): 3 for p in range(4)}
    heard: dict[str, set[TopicPartition]] = {}
    a = StickyAssignor(
        lambda: Claims(generation=3, owned=owned), lambda tps: heard.__setitem__("a", tps)
    )
    b = StickyAssignor(lambda: Claims(), lambda tps: heard.__setitem__("b", tps))
    wire = {
        name: ConsumerProtocolMemberMetadata.decode(assignor.metadata(["requests"]).encode())
        for name, assignor in (("a", a), ("b", b))
    }
    result = a.assign(_Cluster({"requests": 4}), wire)
    for name, assignor in (("a", a), ("b", b)):
        assignor.on_assignment(ConsumerProtocolMemberAssignment.decode(result[name].encode()))
    assert set(result["a"].partitions()) == set(owned)  # busy: nothing moves yet
    # equally busy: the higher partitions go
    assert heard == {
        "a": {TopicPartition("requests", 2), TopicPartition("requests", 3)},
        "b": set(),
    }
