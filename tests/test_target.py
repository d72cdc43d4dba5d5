from __future__ import annotations

from aiokafka.record.default_records import DefaultRecordBatchBuilder
from hypothesis import given
from hypothesis import strategies as st

from stream.backfill.target import batch_bytes, origin, oversize

_bytes = st.binary(max_size=300)  # lengths of one and two varint bytes
_headers = st.lists(st.tuples(st.text(max_size=200), st.none() | _bytes), max_size=4)


@given(key=st.none() | _bytes, value=st.none() | _bytes, headers=_headers)
def test_batch_bytes_is_the_size_of_the_batch_kafka_gets(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    assert batch_bytes(key, value, headers) == _built(key, value, headers)


def _built(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]) -> int:
    batch = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 10_000_000)  # v2, uncompressed
    batch.append(0, 1_700_000_000_000, key, value, headers)
    return len(batch.build())


def test_oversize_says_why_only_past_the_limit() -> None:
    # the largest record a topic takes by default: 1,048,588 bytes in its batch
    assert (
        batch_bytes(None, b"x" * 1_048_516, []) == _built(None, b"x" * 1_048_516, []) == 1_048_588
    )
    size = batch_bytes(None, b"x" * 1000, [("replayed-from", b"t/0/1")])
    assert oversize(None, b"x" * 1000, [("replayed-from", b"t/0/1")], size) is None
    why = oversize(None, b"x" * 1000, [("replayed-from", b"t/0/1")], size - 1)
    assert why == f"larger than the target takes ({size:,} bytes, max.message.bytes {size - 1:,})"


@given(st.lists(st.tuples(st.sampled_from(["replayed-from", "other"]), st.none() | st.binary())))
def test_origin_never_fails_on_any_header(headers: list[tuple[str, bytes | None]]) -> None:
    found = origin(headers, "replayed-from")
    if found is not None:
        assert found[1] >= 0 and found[2] >= 0


def test_origin_reads_only_topic_partition_offset() -> None:
    assert origin([("replayed-from", b"a/b.c/2/17")], "replayed-from") == ("a/b.c", 2, 17)
    assert origin([("replayed-from", None), ("replayed-from", b"t/0/3")], "replayed-from") == (
        "t",
        0,
        3,
    )
    for bad in (b"", b"t/1", "t/\u00b2/1".encode(), b"t/-1/0", b"t/0/ 1", b"\xff\xfe"):
        assert origin([("replayed-from", bad)], "replayed-from") is None
    assert origin([("other", b"t/0/1")], "replayed-from") is None
