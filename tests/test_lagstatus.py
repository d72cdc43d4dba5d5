from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.observe.lagstatus import ATTENTION, Sample, Status, Windows, evaluate, worst

OLD = 3600.0  # an unprocessed record older than any stall threshold


def window(
    offsets: list[int],
    ends: list[int],
    *,
    metadata: list[str] | None = None,
    owned: bool | None = True,
    age: float | None = OLD,
) -> list[Sample]:
    return [
        Sample(
            at=10.0 * i,
            position=offset,
            lag=end - offset,
            metadata=metadata[i] if metadata else "",
            owned=owned,
            age_low=0.0 if age is None else age,
            age_high=math.inf if age is None else age,
        )
        for i, (offset, end) in enumerate(zip(offsets, ends, strict=True))
    ]


# --- one scenario per status -------------------------------------------------------------


def test_idle_topic_with_zero_lag_is_ok_with_or_without_a_consumer() -> None:
    for owned in (True, False, None):
        assert evaluate(window([50, 50, 50], [50, 50, 50], owned=owned, age=0.0)) is Status.OK


def test_offset_going_backwards_is_rewind() -> None:
    assert evaluate(window([100, 120, 40], [130, 140, 150])) is Status.REWIND


def test_stuck_offset_with_an_owner_and_no_finished_work_is_stall() -> None:
    assert evaluate(window([10, 10, 10], [30, 35, 40])) is Status.STALL


def test_stuck_offset_without_an_owner_is_unowned() -> None:
    assert evaluate(window([10, 10, 10], [30, 30, 30], owned=False)) is Status.UNOWNED


def test_lag_growing_while_the_consumer_moves_is_warn() -> None:
    assert evaluate(window([10, 20, 30], [30, 45, 60])) is Status.WARN


def test_consumer_keeping_pace_is_ok() -> None:
    assert evaluate(window([10, 20, 30], [30, 40, 50])) is Status.OK


def test_stuck_watermark_with_work_finishing_above_it_is_not_a_stall() -> None:
    # one slow call holds the watermark; the metadata shows later records finishing
    assert evaluate(window([10, 10, 10], [40, 40, 40], metadata=["a", "b", "c"])) is Status.OK
    growing = window([10, 10, 10], [40, 50, 60], metadata=["a", "b", "c"])
    assert evaluate(growing) is Status.WARN


def test_young_oldest_record_rules_out_stall_but_not_unowned() -> None:
    assert evaluate(window([10, 10, 10], [12, 12, 12], age=5.0)) is Status.OK
    assert evaluate(window([10, 10], [12, 12], age=5.0), stall_after_s=1.0) is Status.STALL
    # records wait and nobody owns the partition: no timestamp, however young, makes it OK
    assert evaluate(window([10, 10, 10], [12, 12, 12], age=5.0, owned=False)) is Status.UNOWNED
    assert evaluate(window([10], [12], age=0.0, owned=False)) is Status.UNOWNED


def test_an_age_that_cannot_tell_slow_from_stuck_is_unknown_not_stall() -> None:
    # at least 10 s (our own looks), at most an hour: a slow call or a stuck one
    unsure = [s._replace(age_low=10.0, age_high=OLD) for s in window([10, 10, 10], [12] * 3)]
    assert evaluate(unsure) is Status.UNKNOWN
    assert evaluate(unsure[-1:]) is Status.UNKNOWN
    surely_old = [s._replace(age_low=400.0) for s in unsure]
    assert evaluate(surely_old) is Status.STALL and evaluate(surely_old[-1:]) is Status.BEHIND
    surely_young = [s._replace(age_high=60.0) for s in unsure]
    assert evaluate(surely_young) is Status.OK and evaluate(surely_young[-1:]) is Status.OK
    moving = [s._replace(position=10 + i) for i, s in enumerate(unsure)]
    assert evaluate(moving) is Status.OK  # a member that makes progress is not stalled


def test_unknown_offsets_are_unknown_not_ok() -> None:
    assert evaluate([]) is Status.UNKNOWN
    assert evaluate([Sample(at=0.0, position=None, lag=None)]) is Status.UNKNOWN
    assert evaluate([Sample(at=0.0, position=3, lag=None)]) is Status.UNKNOWN
    assert evaluate([Sample(at=0.0, position=None, lag=4)]) is Status.UNKNOWN
    # an older sample knew, the latest does not: nothing is assumed
    assert evaluate(window([3], [3]) + [Sample(at=20.0, position=3, lag=None)]) is Status.UNKNOWN


def test_one_look_speaks_only_through_the_age_of_the_oldest_record() -> None:
    assert evaluate([Sample(at=0.0, position=10, lag=0)]) is Status.OK
    assert evaluate(window([3], [10], age=None)) is Status.UNKNOWN
    assert evaluate(window([3], [10], age=5.0)) is Status.OK
    assert evaluate(window([3], [10], age=OLD)) is Status.BEHIND
    assert evaluate(window([3], [10], age=OLD, owned=None)) is Status.BEHIND
    assert evaluate(window([3], [10], age=OLD, owned=False)) is Status.UNOWNED


def test_worst_orders_by_alarm() -> None:
    assert worst([]) is Status.OK
    assert worst([Status.OK, Status.WARN, Status.REWIND]) is Status.REWIND
    assert worst([Status.STALL, Status.UNOWNED, Status.OK]) is Status.UNOWNED
    assert worst([Status.BEHIND, Status.WARN]) is Status.BEHIND
    assert all(worst([Status.OK, s]) is s for s in Status)  # each has a severity
    assert ATTENTION < set(Status)


def test_windows_keep_the_last_samples_per_key() -> None:
    windows: Windows[str] = Windows(size=2)
    for i in range(5):
        kept = windows.add("a", Sample(at=float(i), position=i, lag=0))
    assert [s.position for s in kept] == [3, 4]
    windows.add("b", Sample(at=0.0, position=0, lag=0))
    windows.retain({"b"})
    assert len(windows) == 1
    with pytest.raises(ValueError):
        Windows(size=0)


# --- properties --------------------------------------------------------------------------


@st.composite
def windows_of_samples(draw: st.DrawFn) -> list[Sample]:
    """Random but well-formed windows: end offsets never go backwards."""
    size = draw(st.integers(1, 8))
    ends = sorted(draw(st.lists(st.integers(0, 1000), min_size=size, max_size=size)))
    offsets = [draw(st.integers(0, end)) for end in ends]
    metadata = draw(st.lists(st.sampled_from(["", "x", "y"]), min_size=size, max_size=size))
    owned = draw(st.sampled_from([True, False, None]))
    low = draw(st.floats(0, 10_000))
    high = draw(st.one_of(st.just(math.inf), st.floats(low, 10_000), st.just(low)))
    return [
        Sample(
            at=float(i),
            position=o,
            lag=e - o,
            metadata=m,
            owned=owned,
            age_low=low,
            age_high=high,
        )
        for i, (o, e, m) in enumerate(zip(offsets, ends, metadata, strict=True))
    ]


@given(windows_of_samples())
def test_rewind_exactly_when_an_offset_goes_backwards(samples: list[Sample]) -> None:
    backwards = any(b.position < a.position for a, b in pairwise(samples))  # type: ignore[operator]
    assert (evaluate(samples) is Status.REWIND) == backwards


@given(windows_of_samples())
def test_caught_up_at_any_point_is_ok_unless_rewound(samples: list[Sample]) -> None:
    status = evaluate(samples)
    if any(s.lag == 0 for s in samples) and status is not Status.REWIND:
        assert status is Status.OK


@given(st.integers(0, 10**9), st.integers(1, 10), st.sampled_from([True, False, None]))
def test_idle_zero_lag_is_always_ok(offset: int, size: int, owned: bool | None) -> None:
    samples = window([offset] * size, [offset] * size, owned=owned, age=None)
    assert evaluate(samples) is Status.OK


@given(windows_of_samples())
def test_attention_needs_lag_and_a_surely_old_record_or_no_owner(samples: list[Sample]) -> None:
    status = evaluate(samples, stall_after_s=60.0)
    if status in ATTENTION:
        assert all(s.lag is not None and s.lag > 0 for s in samples)
    if status in (Status.STALL, Status.BEHIND):
        assert samples[-1].age_low >= 60.0  # the record is surely older than the threshold
    if status is Status.STALL:
        assert len({s.position for s in samples}) == 1
        assert len({s.metadata for s in samples}) == 1


@given(windows_of_samples())
def test_unowned_with_records_waiting_is_never_ok(samples: list[Sample]) -> None:
    rewound = any(b.position < a.position for a, b in pairwise(samples))  # type: ignore[operator]
    waiting = all(s.lag is not None and s.lag > 0 for s in samples)
    unowned = samples[-1].owned is False and waiting and not rewound
    assert (evaluate(samples) is Status.UNOWNED) == unowned


@given(windows_of_samples(), st.floats(0, 10_000))
def test_a_window_that_moved_is_never_stall(samples: list[Sample], threshold: float) -> None:
    if samples[0].position != samples[-1].position:
        assert evaluate(samples, stall_after_s=threshold) not in (Status.STALL, Status.UNKNOWN)


@given(windows_of_samples(), st.floats(0, 10_000))
def test_unknown_only_when_the_age_straddles_the_threshold(
    samples: list[Sample], threshold: float
) -> None:
    if evaluate(samples, stall_after_s=threshold) is Status.UNKNOWN:
        assert samples[-1].age_low < threshold <= samples[-1].age_high


@given(windows_of_samples())
def test_unowned_only_without_an_owner_and_stall_only_without_a_known_absence(
    samples: list[Sample],
) -> None:
    status = evaluate(samples)
    if status is Status.UNOWNED:
        assert samples[-1].owned is False
    if status in (Status.STALL, Status.BEHIND):
        assert samples[-1].owned is not False


@given(windows_of_samples())
def test_one_look_and_window_statuses_stay_apart(samples: list[Sample]) -> None:
    status = evaluate(samples)
    if len(samples) == 1:
        assert status not in (Status.STALL, Status.WARN, Status.REWIND)
    else:
        assert status is not Status.BEHIND


@given(windows_of_samples(), st.floats(1, 10_000))
def test_a_record_younger_than_the_threshold_never_alarms(
    samples: list[Sample], threshold: float
) -> None:
    young = [s._replace(age_low=0.0, age_high=threshold / 2, owned=True) for s in samples]
    assert evaluate(young, stall_after_s=threshold) not in ATTENTION


@given(windows_of_samples())
def test_warn_needs_lag_that_never_fell_and_grew(samples: list[Sample]) -> None:
    if evaluate(samples) is Status.WARN:
        lags = [s.lag for s in samples]
        assert all(b >= a for a, b in pairwise(lags))  # type: ignore[operator]
        assert lags[-1] > lags[0]  # type: ignore[operator]


@given(windows_of_samples(), st.floats(-1e6, 1e6))
def test_status_does_not_depend_on_the_clock_origin(samples: list[Sample], shift: float) -> None:
    shifted = [s._replace(at=s.at + shift) for s in samples]
    assert evaluate(shifted) is evaluate(samples)
