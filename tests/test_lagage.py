from __future__ import annotations

import math

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from stream.observe.lagage import SKEW_S, EndHistory, age

NOW = 1_800_000_000.0  # wall-clock seconds
HOUR = 3600.0

# timestamps of any value a producer can set: none, the epoch, before it, far ahead, near now
stamps = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(int((NOW - 10 * HOUR) * 1000), int((NOW + 10 * HOUR) * 1000)),
    st.sampled_from([-1, 0, 1]),
)


def ms(seconds_ago: float) -> int:
    return int((NOW - seconds_ago) * 1000)


# --- the three lies of the hostile-input pass --------------------------------------------


def test_a_stamp_before_its_predecessor_is_not_believed() -> None:
    # timestamp 0 on a record whose predecessor was written 20 s ago
    low, high, shown = age(NOW, 0, before_ms=ms(20))
    assert (low, high, shown) == (0.0, pytest.approx(20.0), None)
    # our own looks saw it arrive between 12 s and 15 s ago: that is what it shows
    assert age(NOW, 0, before_ms=ms(20), seen_at=NOW - 12, absent_at=NOW - 15) == (
        pytest.approx(12.0),
        pytest.approx(15.0),
        pytest.approx(12.0),
    )


def test_no_stamp_leaves_the_bounds_alone() -> None:
    assert age(NOW, -1) == (0.0, math.inf, None)
    assert age(NOW, None, seen_at=NOW - 400) == (400.0, math.inf, 400.0)


def test_a_stamp_in_the_future_is_not_believed() -> None:
    # an hour-ahead clock says "50 minutes from now": nothing young is known from that
    assert age(NOW, ms(-50 * 60)) == (0.0, math.inf, None)
    assert age(NOW, ms(-50 * 60), seen_at=NOW - 30) == (30.0, math.inf, 30.0)


def test_an_honest_stamp_is_the_age() -> None:
    assert age(NOW, ms(120), before_ms=ms(130)) == (120.0, 120.0, 120.0)
    # a producer a few seconds ahead of us, or of its predecessor's producer, still tells time
    assert age(NOW, ms(-5)) == (0.0, 0.0, 0.0)
    assert age(NOW, ms(125), before_ms=ms(120)) == (120.0, 120.0, 120.0)


# --- properties --------------------------------------------------------------------------


@given(
    stamps,
    stamps,
    st.one_of(st.none(), st.floats(0, 10 * HOUR)),
    st.one_of(st.none(), st.floats(0, 10 * HOUR)),
)
def test_no_stamp_moves_the_age_out_of_what_our_own_looks_know(
    stamp: int | None, before: int | None, seen_ago: float | None, absent_ago: float | None
) -> None:
    """Whatever a producer stamps, the age stays within our own clock's bounds, and within
    the predecessor's where that one tells a time."""
    if seen_ago is not None and absent_ago is not None:
        assume(absent_ago >= seen_ago)  # the log end was below it before it was there
    seen_at = None if seen_ago is None else NOW - seen_ago
    absent_at = None if absent_ago is None else NOW - absent_ago
    low, high, shown = age(NOW, stamp, before_ms=before, seen_at=seen_at, absent_at=absent_at)

    tiny = 1e-6  # NOW - x + x is x only up to float rounding
    assert 0.0 <= low <= high
    assert low >= (seen_ago or 0.0) - tiny
    if absent_ago is not None:
        assert high <= absent_ago + tiny
    if before is not None and 0 <= before <= (NOW + SKEW_S) * 1000 and seen_ago is None:
        assert high <= max(0.0, NOW - before / 1000) + tiny
    assert shown is None or low <= shown <= high
    assert shown is not None or low == 0.0
    assert not math.isnan(low) and not math.isnan(high)


@example(true_age=0.1, seen_fraction=0.0, skew=-5.960464477539063e-08)
@given(st.floats(0, 10 * HOUR), st.floats(0, 1), st.floats(-SKEW_S, SKEW_S))
def test_an_honest_stamp_is_believed_within_the_skew(
    true_age: float, seen_fraction: float, skew: float
) -> None:
    """A record that really is `true_age` old, stamped by a clock off by at most the skew,
    and seen by our own looks: its age is believed, to within that skew."""
    seen_at = NOW - true_age * seen_fraction  # we saw it after it arrived
    low, high, shown = age(NOW, ms(true_age - skew), seen_at=seen_at)
    assert low == high == shown
    # The stamp is whole milliseconds, cut down: up to 1 ms older, and a float's error more
    # (0.1 s with a skew of -6e-8 came out 0.101000..., once in CI).
    cut = 1e-3 + 1e-6
    assert shown == pytest.approx(max(true_age - skew, true_age * seen_fraction), abs=cut)
    assert abs(shown - true_age) <= SKEW_S + cut


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(0, 5)), max_size=40), st.integers(0, 60))
def test_end_history_bounds_match_every_look(steps: list[tuple[float, int]], offset: int) -> None:
    """Looks at rising times of a log end that never falls: the first look that saw the
    record, and the last that did not, are exactly what the history answers."""
    history: EndHistory[str] = EndHistory(size=100)
    looks, at, end = [], 0.0, 0
    for gap, grew in steps:
        at, end = at + gap, end + grew
        history.add("p", at, end)
        looks.append((at, end))
    seen_at, absent_at = history.bounds("p", offset)
    assert seen_at == next((a for a, e in looks if e > offset), None)
    assert absent_at == next((a for a, e in reversed(looks) if e <= offset), None)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(0, 60))
def test_a_short_history_only_loosens_the_bounds(grows: list[int], offset: int) -> None:
    short: EndHistory[str] = EndHistory(size=3)
    full: EndHistory[str] = EndHistory(size=100)
    end = 0
    for at, grew in enumerate(grows):
        end += grew
        short.add("p", float(at), end)
        full.add("p", float(at), end)
    (seen, absent), (seen_all, absent_all) = short.bounds("p", offset), full.bounds("p", offset)
    if seen is not None:
        assert seen_all is not None and seen >= seen_all  # seen later: a smaller "at least"
    if absent is not None:
        assert absent == absent_all


def test_end_history_forgets_and_restarts() -> None:
    history: EndHistory[str] = EndHistory()
    history.add("p", 1.0, 10)
    history.add("p", 2.0, None)  # an unknown end changes nothing
    assert history.bounds("p", 3) == (1.0, None)
    history.add("p", 3.0, 2)  # the topic was recreated: the earlier looks say nothing now
    assert history.bounds("p", 3) == (None, 3.0)
    history.retain(set())
    assert len(history) == 0 and history.bounds("p", 3) == (None, None)
    with pytest.raises(ValueError):
        EndHistory(size=0)
