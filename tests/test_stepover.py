"""Which offsets a batch aiokafka cannot read holds, found from the error it raised (no
broker: aiokafka's own fetch-result reader over real batches).

aiokafka parses a batch from its start: nothing past a record it cannot decode can be
read, nor any of a batch it cannot inflate. `stream.engine.fetch` stands in for the rest
of that batch at once, reading its bounds from aiokafka's reader, so these tests fail when
aiokafka stops showing them (a batch of 200,000 records would be stepped over a record a
fetch round again: hours).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.record.memory_records import MemoryRecords
from hypothesis import given
from hypothesis import strategies as st

from stream import inflate
from stream.engine import fetch
from stream.engine.fetch import UNDECODABLE, Undecodable
from tests.kit.kafka import bad_key_batch, zstd_batch

TP = TopicPartition("requests", 0)
BOUND = 64 * 1024  # a zstd batch of `count` records of 100 bytes: past it from 650 on


@pytest.fixture(autouse=True)
def bound() -> Iterator[None]:
    inflate.bound_inflation(BOUND)
    yield
    inflate.bound_inflation()


def _at(batch: bytes, base: int) -> bytes:
    """`batch` as the broker keeps it at offset `base` (its base offset is outside the
    CRC)."""
    return struct.pack(">q", base) + batch[8:]


def _read(batches: bytes, position: int) -> tuple[list[int], Undecodable | None]:
    """The offsets aiokafka yields reading from `position`, and what `fetch` makes of the
    error it stops on (the consumer's position then: after the last record yielded)."""
    records = PartitionRecords(TP, MemoryRecords(batches), [], position, None, None, True, 1)
    read: list[int] = []
    try:
        for record in records:
            read.append(record.offset)
            position = record.offset + 1
    except UNDECODABLE as exc:
        return read, fetch._unreadable(TP, position, exc)
    return read, None


def test_a_batch_past_the_bound_is_stood_in_for_whole_after_the_records_before_it() -> None:
    good = _at(zstd_batch([b"ok"] * 5), 20)
    bomb = _at(zstd_batch([bytes(100)] * 1_000), 25)
    read, bad = _read(good + bomb, 22)
    assert read == [22, 23, 24]
    assert bad is not None and (bad.offset, bad.run, bad.batch) == (25, 1_000, (25, 1_025))
    assert "inflates past 65,536 bytes" in bad.error
    assert "@1000 (its batch, @25 to @1024, cannot be read: a zstd batch" in bad.each()[975].says()


def test_a_run_is_capped_and_goes_on_from_where_the_last_one_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fetch, "_MAX_RUN", 300)
    bomb = _at(zstd_batch([bytes(100)] * 1_000), 25)
    _, first = _read(bomb, 25)
    assert first is not None and (first.offset, first.run) == (25, 300)
    _, next_ = _read(bomb, first.offset + first.run)  # where the caller seeks to
    assert next_ is not None and (next_.offset, next_.run) == (325, 300)


def test_the_position_before_the_batch_is_not_stood_in_for() -> None:
    """Markers and aborted records sit before the batch: aiokafka passes over them
    without moving the position, and they hold nothing to read."""
    _, bad = _read(_at(zstd_batch([bytes(100)] * 1_000), 40), 33)
    assert bad is not None and bad.offset == 40


@given(count=st.integers(1, 40), data=st.data())
def test_records_from_the_bad_key_to_the_batch_end_and_only_those(
    count: int, data: st.DataObject
) -> None:
    bad_index = data.draw(st.integers(0, count - 1))
    base = data.draw(st.integers(0, 10**6))
    position = data.draw(st.integers(max(0, base - 3), base + count - 1))
    # a record before the batch, and offsets below it without one (markers, say); the
    # broker answers from the batch that holds the position
    before = _at(zstd_batch([b"before"]), base - 1) if 0 < base and position < base else b""
    batch = _at(bad_key_batch([b"%d" % i for i in range(count)], bad_index), base)
    read, bad = _read(before + batch, position)
    bad_at = base + bad_index
    assert read == list(range(max(position, base - 1 if base else 0), bad_at))
    first = max(position, bad_at)
    assert bad is not None and (bad.offset, bad.run) == (first, base + count - first)
    assert "not UTF-8" in bad.error


def test_without_aiokafkas_reader_in_the_trace_the_record_alone_is_known(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fetch._warn_unseen_batch.cache_clear()
    bad = fetch._unreadable(TP, 7, UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid"))
    assert (bad.offset, bad.run, bad.batch) == (7, 1, None)
    assert "its batch is unreadable past it" in bad.says()
    assert "has it changed?" in caplog.text
