"""Property tests for the offset tracker: commit never passes an unfinished record."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.engine.offsets import (
    PartitionOffsets,
    decode_metadata,
    encode_metadata,
    note_number,
)


@st.composite
def offsets_and_finishes(draw: st.DrawFn) -> tuple[int, list[int], list[int]]:
    """A start offset, increasing offsets with gaps (markers), and an order to finish some."""
    start = draw(st.integers(0, 2**40))
    gaps = draw(st.lists(st.integers(1, 3), min_size=0, max_size=200))
    offsets: list[int] = []
    cursor = start
    for gap in gaps:
        cursor += gap - 1 if not offsets else gap
        offsets.append(cursor)
    finished = draw(st.permutations(offsets))
    finished = finished[: draw(st.integers(0, len(finished)))]
    return start, offsets, finished


def _check_invariants(tracker: PartitionOffsets, accepted: list[int], done: set[int]) -> None:
    unfinished = [o for o in accepted if o not in done]
    if unfinished:
        assert tracker.watermark <= min(unfinished)
    assert all(o in done for o in accepted if o < tracker.watermark)
    assert tracker.pending == len(unfinished)


@given(offsets_and_finishes())
def test_watermark_never_passes_an_unfinished_record(
    case: tuple[int, list[int], list[int]],
) -> None:
    start, offsets, finished = case
    tracker = PartitionOffsets(start)
    accepted: list[int] = []
    done: set[int] = set()
    for offset in offsets:
        assert tracker.accept(offset)
        accepted.append(offset)
        _check_invariants(tracker, accepted, done)
    for offset in finished:
        tracker.finish(offset)
        done.add(offset)
        _check_invariants(tracker, accepted, done)
    if len(done) == len(accepted) and accepted:
        assert tracker.watermark == accepted[-1] + 1
    assert set(tracker.finished_above()) == {o for o in done if o >= tracker.watermark}


def _tracked(start: int, offsets: list[int], finished: list[int]) -> PartitionOffsets:
    """A tracker from `start` that accepted `offsets` and finished `finished`."""
    tracker = PartitionOffsets(start)
    for offset in offsets:
        tracker.accept(offset)
    for offset in finished:
        tracker.finish(offset)
    return tracker


@given(offsets_and_finishes(), st.integers(8, 400))
def test_restart_skips_only_finished_records(
    case: tuple[int, list[int], list[int]], max_chars: int
) -> None:
    """A new owner reading the commit re-runs every unfinished record, skips only finished."""
    start, offsets, finished = case
    tracker = _tracked(start, offsets, finished)
    committed, metadata = tracker.watermark, tracker.metadata(max_chars)
    assert len(metadata) <= max_chars

    successor = PartitionOffsets(committed, decode_metadata(metadata, committed))
    skipped = {o for o in offsets if o >= committed and not successor.accept(o)}
    assert skipped <= set(finished)  # never claims an unfinished record finished
    if max_chars >= 400 and len(offsets) <= 50:
        assert skipped == {o for o in finished if o >= committed}  # nothing finished re-runs


@given(st.integers(0, 2**62), st.sets(st.integers(1, 10_000), max_size=300))
def test_metadata_round_trips(watermark: int, above: set[int]) -> None:
    finished = sorted(watermark + delta for delta in above)
    metadata = encode_metadata(watermark, finished, max_chars=100_000)
    assert decode_metadata(metadata, watermark) == finished


@given(st.integers(0, 2**40), st.lists(st.integers(1, 10_000), unique=True, max_size=2000))
def test_metadata_that_does_not_fit_is_a_true_prefix(watermark: int, deltas: list[int]) -> None:
    finished = sorted(watermark + d for d in deltas)
    metadata = encode_metadata(watermark, finished)
    assert len(metadata) <= 4000
    decoded = decode_metadata(metadata, watermark)
    assert decoded == finished[: len(decoded)]


def test_metadata_is_compact_for_a_realistic_window() -> None:
    """500 in flight scattered over a window of 5,000 finished records: far below 4096."""
    finished = [o for o in range(1, 5_500) if o % 11]
    metadata = encode_metadata(0, finished)
    assert decode_metadata(metadata, 0) == finished
    assert len(metadata) < 2000


@settings(max_examples=300)
@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    ),
    st.integers(0, 2**40),
)
def test_garbage_metadata_is_treated_as_none(metadata: str, committed: int) -> None:
    decoded = decode_metadata(metadata, committed)
    assert isinstance(decoded, list)
    assert all(o >= committed for o in decoded)


def test_metadata_for_another_watermark_is_ignored() -> None:
    metadata = encode_metadata(100, [102, 103])
    assert decode_metadata(metadata, 100) == [102, 103]
    assert decode_metadata(metadata, 90) == []  # someone reset the offset: trust nothing


def test_redelivered_records_are_skipped() -> None:
    tracker = PartitionOffsets(5)
    assert tracker.accept(5) and tracker.accept(6)
    assert not tracker.accept(5)
    assert not tracker.accept(4)
    tracker.finish(6)
    assert (tracker.watermark, tracker.finished_above(), tracker.pending) == (5, [6], 1)


def _varint(value: int) -> bytes:
    """An unsigned LEB128 number, as the metadata format writes them: written out here, so
    hostile input is made without the encoder under test."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def test_crafted_metadata_cannot_make_us_allocate_without_bound() -> None:
    data = bytes([1]) + _varint(100)  # the format's version, then the committed watermark
    data += (_varint(1) + _varint(999_999)) * 2000  # runs claiming ~2e9 finished offsets
    crafted = base64.urlsafe_b64encode(data).decode()
    assert decode_metadata(crafted, 100) == []


@given(st.text(max_size=40))
def test_a_note_is_a_number_only_when_it_is_ascii_digits_kafka_can_hold(value: str) -> None:
    number = note_number({"since": value}, "since")
    if number is None:
        assert not (value.isascii() and value.isdigit() and len(value) <= 18)
    else:
        assert str(number) == value.lstrip("0") or number == 0
        assert 0 <= number < 2**63


def test_digits_python_takes_but_int_refuses_are_no_number() -> None:
    for forged in ("\u00b2", "\u2460", "\u1369", "1\u00b2", "9" * 19, "", "-1", " 1"):
        assert note_number({"started": forged}, "started") is None
    assert note_number({"started": "0042"}, "started") == 42
    assert note_number({}, "started") is None


@given(offsets_and_finishes(), st.data())
def test_a_successor_knows_what_is_finished_as_records_come_again(
    case: tuple[int, list[int], list[int]], data: st.DataObject
) -> None:
    """What the metadata says is finished stays finished until its record comes again;
    one the broker skips (a gap below the next that comes) is given up."""
    start, offsets, finished = case
    tracker = _tracked(start, offsets, finished)
    committed = tracker.watermark
    restored = set(decode_metadata(tracker.metadata(100_000), committed))
    successor = PartitionOffsets(committed, sorted(restored))
    again = [o for o in offsets if o >= committed]
    delivered = data.draw(st.lists(st.sampled_from(again), unique=True)) if again else []
    for offset in sorted(delivered):
        successor.accept(offset)
    high = max(delivered, default=committed - 1) + 1
    for offset in range(committed - 1, max(offsets, default=start) + 3):
        expected = offset < successor.watermark or (
            offset in restored and (offset in delivered or offset >= high)
        )
        assert successor.finished(offset) == expected, offset
