"""Compressed batches inflate within a bound: the same bytes as aiokafka's own decoders
below it, `InflatedTooLarge` past it, corrupt input refused as before."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import cramjam
import pytest
from aiokafka import TopicPartition, codec
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stream import inflate
from stream.config import Settings
from stream.errors import ConfigError
from stream.inflate import InflatedTooLarge
from stream.kafka import consumer_client
from tests.kit.kafka import create_topic

LIMIT = 4096

ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": codec.gzip_encode,
    "lz4": codec.lz4_encode,
    "zstd": codec.zstd_encode,
    "snappy": lambda data: codec.snappy_encode(data, xerial_compatible=True, xerial_blocksize=512),
    "snappy-raw": lambda data: codec.snappy_encode(data, xerial_compatible=False),
}
ORIGINAL = {
    "gzip": codec.gzip_decode,
    "lz4": codec.lz4_decode,
    "zstd": codec.zstd_decode,
    "snappy": codec.snappy_decode,
    "snappy-raw": codec.snappy_decode,
}


def _decoder(name: str) -> Callable[[Any], bytes]:
    if name.startswith("snappy"):
        return inflate._snappy_within(LIMIT)
    return inflate.inflate_within(getattr(cramjam, name).decompress_into, name, LIMIT)


# Text-like (compresses a little), zeros (compresses a lot), random (not at all), at sizes
# around the limit and each retry's buffer.
payloads = st.one_of(
    st.binary(max_size=LIMIT),
    st.integers(0, LIMIT).map(bytes),
    st.sampled_from([b"ab" * (LIMIT // 2), b"\0" * LIMIT, b"x" * (LIMIT - 1)]),
)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(ENCODERS)), payload=payloads)
def test_a_batch_within_the_bound_inflates_as_aiokafka_inflates_it(
    name: str, payload: bytes
) -> None:
    # (aiokafka's own xerial snappy cannot read back an empty payload; a batch never is)
    assume(payload or name != "snappy")
    compressed = ENCODERS[name](payload)
    assert _decoder(name)(memoryview(compressed)) == ORIGINAL[name](compressed) == payload


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("size", [LIMIT + 1, 100 * LIMIT])
def test_a_batch_past_the_bound_is_refused(name: str, size: int) -> None:
    compressed = ENCODERS[name](b"\0" * size)
    with pytest.raises(InflatedTooLarge, match=f"{name.split('-')[0]} batch of"):
        _decoder(name)(compressed)


@pytest.mark.parametrize("name", ["gzip", "lz4", "zstd"])
def test_a_corrupt_batch_is_refused_as_before(name: str) -> None:
    # (aiokafka's gzip raises zlib's error, the others and ours cramjam's)
    compressed = bytearray(ENCODERS[name](b"hello " * 200))
    compressed[len(compressed) // 2 :] = b"\xff" * (len(compressed) - len(compressed) // 2)
    with pytest.raises(Exception, match="."):
        ORIGINAL[name](bytes(compressed))
    with pytest.raises(cramjam.DecompressionError):
        _decoder(name)(bytes(compressed))


def _zstd_batch(inflated: int) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=DefaultRecordBatch.CODEC_ZSTD,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=2**31 - 1,
    )
    builder.append(0, timestamp=None, key=b"k", value=b"\0" * inflated, headers=[])
    return bytes(builder.build())


def test_aiokafkas_batch_reader_inflates_within_the_bound() -> None:
    """Installed where aiokafka's (compiled) batch reader looks its decoders up."""
    batch = _zstd_batch(2 * LIMIT)
    try:
        inflate.bound_inflation(LIMIT)
        with pytest.raises(InflatedTooLarge):
            list(DefaultRecordBatch(bytearray(batch)))
        inflate.bound_inflation(4 * LIMIT)
        assert [r.value for r in DefaultRecordBatch(bytearray(batch))] == [b"\0" * (2 * LIMIT)]
    finally:
        inflate.bound_inflation()


def test_the_bound_is_a_whole_number_of_mib_and_says_so() -> None:
    assert Settings.from_env({}).kafka.max_batch_bytes == inflate.MAX_INFLATED_BYTES
    assert Settings.from_env({"STREAM_KAFKA_MAX_BATCH_MB": "64"}).kafka.max_batch_mb == 64
    for bad in ("0", "1025", "16MB", "1.5"):
        with pytest.raises(ConfigError, match=r"^STREAM_KAFKA_MAX_BATCH_MB must be"):
            Settings.from_env({"STREAM_KAFKA_MAX_BATCH_MB": bad})


@pytest.mark.anyio
async def test_every_consumer_reads_within_the_operators_bound(settings: Settings) -> None:
    """A consumer of ours (the worker's, replay's, redrive's, the lag reader's) puts the
    bound its settings say in place before it reads."""
    batch = _zstd_batch(2 * 1024 * 1024)
    tp = TopicPartition(await create_topic(settings, "inflate", 1), 0)
    try:
        for mib, fits in ((1, False), (4, True)):
            kafka = replace(settings.kafka, max_batch_mb=mib)
            async with consumer_client(kafka, doing="reading") as consumer:
                consumer.assign([tp])
                await consumer.position(tp)
                if fits:
                    assert len(list(DefaultRecordBatch(bytearray(batch)))) == 1
                else:
                    with pytest.raises(InflatedTooLarge, match="inflates past 1,048,576"):
                        list(DefaultRecordBatch(bytearray(batch)))
    finally:
        inflate.bound_inflation()


def _records_section(records: list[tuple[bytes | None, bytes | None, int]]) -> bytes:
    """Kafka's record format v2, uncompressed: the records after the batch's header."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=2**31 - 1,
    )
    for offset, (key, value, count) in enumerate(records):
        headers = [(f"h{i}", b"v" if i % 2 else None) for i in range(count)]
        builder.append(offset, timestamp=None, key=key, value=value, headers=headers)
    return bytes(builder.build())[61:]  # a v2 batch header is 61 bytes


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.none() | st.binary(max_size=300), st.none() | st.binary(), st.integers(0, 40)),
        min_size=1,
        max_size=8,
    )
)
def test_the_scan_finds_the_most_headers_any_record_carries(
    records: list[tuple[bytes | None, bytes | None, int]],
) -> None:
    assert inflate.most_headers(_records_section(records)) == max(c for _, _, c in records)


def test_a_large_batch_with_a_record_of_too_many_headers_is_refused() -> None:
    padding = b"\0" * (300 * 1024)  # past the size from which inflated batches are scanned
    many = _records_section([(b"k", padding, 0), (None, b"{}", inflate.MAX_HEADERS + 1)])
    few = _records_section([(b"k", padding, 0), (None, b"{}", inflate.MAX_HEADERS)])
    decode = inflate.inflate_within(cramjam.zstd.decompress_into, "zstd", 1024 * 1024)
    with pytest.raises(InflatedTooLarge, match=r"carries 257 headers, over 256"):
        decode(codec.zstd_encode(many))
    assert decode(codec.zstd_encode(few)) == few
    snappy = inflate._snappy_within(1024 * 1024)
    with pytest.raises(InflatedTooLarge, match=r"a record of a snappy batch carries 257"):
        snappy(codec.snappy_encode(many))


def test_a_snappy_block_of_no_length_is_refused_not_looped_on() -> None:
    # snappy-java's framing: a 16-byte header, then blocks, each after its length
    framed = codec.snappy_encode(b"hello" * 100, xerial_compatible=True, xerial_blocksize=64)
    broken = framed[:16] + (-4).to_bytes(4, "big", signed=True) + framed[20:]
    with pytest.raises(cramjam.DecompressionError, match="no length"):
        inflate._snappy_within(LIMIT)(broken)
