"""Compressed record batches inflated within a bound.

A producer may compress a batch (gzip, snappy, lz4, zstd) and the broker keeps it as it
came; the consumer inflates the whole batch before it reads the first record. aiokafka
inflates it in one piece, however large: a 16 kB zstd batch holding one value of 500 MB
of zeros took a consumer to 1 GB of memory, and a batch at a topic's 1 MB limit inflates
to tens of GB. Whichever worker takes that partition is killed for memory, and so is the
next: the group crash-loops on one record any upstream can write.

`bound_inflation` replaces aiokafka's four decoders in its record readers with ones that
write into a buffer grown up to the bound (STREAM_KAFKA_MAX_BATCH_MB, 16 MiB by default)
and stop there (a few milliseconds of CPU, the bound's memory at most), raising
`InflatedTooLarge`: the fetch seam (`stream.engine.fetch`) then hands the record to the
error path, a dead letter like any record the client cannot decode. Real batches are far
below it: a producer closes a batch at its batch.size (Kafka's default 16 kB, of the
compressed bytes; rarely above 1 MB).

Bytes are not all: a record header takes two bytes inflated and ~100 as aiokafka's tuple,
and aiokafka makes every header of a record at once. One record of 16 MiB of empty headers
took a worker to 833 MB; twelve, to 6 GB. So an inflated batch larger than `_SCAN_FROM`
(few real ones are) is read record by record first (~2 µs a record), and one whose record
carries more than `MAX_HEADERS` headers is refused too. (A smaller batch holds too few
headers to matter at once; the engine drops records with too many before it queues them,
`stream.engine.fetch.to_keep`.)
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable
from typing import Any

import cramjam
from aiokafka import codec

__all__ = [
    "MAX_HEADERS",
    "MAX_INFLATED_BYTES",
    "InflatedTooLarge",
    "bound_inflation",
    "inflate_within",
]

# The most one batch inflates to, in bytes, unless told otherwise.
MAX_INFLATED_BYTES = 16 * 1024 * 1024
# The most headers one record may carry (Kafka sets no limit; real records carry a few).
MAX_HEADERS = 256
# An inflated batch larger than this is scanned for records with more headers than that.
_SCAN_FROM = 256 * 1024
# The first buffer, as a multiple of the compressed size (text compresses 3-10 times), and
# at least this many bytes; each retry makes it four times larger, up to the bound.
_FIRST_RATIO = 8
_FIRST_LEAST = 64 * 1024
_GROWTH = 4
# What aiokafka's modules that read record batches call the decoders.
_READERS = ("aiokafka.record.default_records", "aiokafka.record._crecords.default_records")
_XERIAL_HEADER = 16  # snappy-java's framing: a 16-byte header, then blocks with a length


class InflatedTooLarge(Exception):
    """A compressed batch would inflate past the bound, or holds a record with more than
    `MAX_HEADERS` headers."""


Decoder = Callable[[Any], bytes]


def inflate_within(
    decompress_into: Callable[[Any, bytearray], int], codec_name: str, limit: int
) -> Decoder:
    """A decoder that inflates into a buffer grown up to `limit` bytes, and raises
    `InflatedTooLarge` past it (cramjam stops writing when the buffer is full)."""

    def decode(payload: Any) -> bytes:
        size = min(limit, max(_FIRST_LEAST, _FIRST_RATIO * len(payload)))
        while True:
            buffer = bytearray(size + 1)  # filled whole: there may be more
            try:
                written = decompress_into(payload, buffer)
            except cramjam.DecompressionError as exc:
                if "whole buffer" not in str(exc):
                    raise  # corrupt, not large: as aiokafka's own decoder would
                written = len(buffer)
            if written <= size:
                inflated = bytes(memoryview(buffer)[:written])
                _check_headers(inflated, codec_name)
                return inflated
            if size >= limit:
                raise InflatedTooLarge(
                    f"a {codec_name} batch of {len(payload):,} bytes inflates past {limit:,} bytes"
                )
            size = min(limit, size * _GROWTH)

    return decode


def _snappy_within(limit: int) -> Decoder:
    """Snappy says its inflated length up front (each block of snappy-java's framing
    does): judged before anything is inflated, then aiokafka's own decoder runs."""

    def decode(payload: Any) -> bytes:
        data = bytes(payload)
        if codec._detect_xerial_stream(data):
            total, cursor = 0, _XERIAL_HEADER
            while cursor < len(data):
                (length,) = struct.unpack_from("!i", data, cursor)
                if length <= 0:  # (it would step back for ever)
                    raise cramjam.DecompressionError("snappy: a block of no length")
                cursor += 4
                total += cramjam.snappy.decompress_raw_len(data[cursor : cursor + length])
                cursor += length
        else:
            total = cramjam.snappy.decompress_raw_len(data)
        if total > limit:
            raise InflatedTooLarge(
                f"a snappy batch of {len(data):,} bytes inflates to {total:,} bytes, past {limit:,}"
            )
        inflated: bytes = codec.snappy_decode(data)
        _check_headers(inflated, "snappy")
        return inflated

    return decode


def _check_headers(inflated: bytes, codec_name: str) -> None:
    """Refuse a large inflated batch (the records of a v2 batch, one after the other) whose
    record carries more than `MAX_HEADERS` headers, before aiokafka makes them all."""
    if len(inflated) <= _SCAN_FROM:
        return
    most = most_headers(inflated)
    if most > MAX_HEADERS:
        raise InflatedTooLarge(
            f"a record of a {codec_name} batch carries {most:,} headers, over {MAX_HEADERS}"
        )


def most_headers(records: bytes) -> int:
    """The most headers a record of `records` carries, read as Kafka's record format v2
    (length, attributes, timestamp and offset deltas, key, value, header count, headers);
    as far as it reads: what it cannot read aiokafka refuses after it."""
    most, cursor, end = 0, 0, len(records)
    try:
        while cursor < end:
            length, cursor = _varint(records, cursor)
            next_record = cursor + length
            at = cursor + 1  # attributes
            _, at = _varint(records, at)  # timestamp delta
            _, at = _varint(records, at)  # offset delta
            key, at = _varint(records, at)
            value, at = _varint(records, at + max(key, 0))
            count, _ = _varint(records, at + max(value, 0))
            if count > most:
                most = count
                if most > MAX_HEADERS:
                    return most
            if next_record <= cursor:
                return most  # not a record: nothing further to read
            cursor = next_record
    except IndexError:
        pass
    return most


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """A zigzag varint at `at`: its value and where the next field starts."""
    shift = result = 0
    while True:
        byte = data[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), at
        shift += 7
        if shift > 63:
            raise IndexError("not a varint")


def bound_inflation(limit: int = MAX_INFLATED_BYTES) -> None:
    """Make every batch this process reads from Kafka inflate within `limit` bytes (at
    once for every consumer: aiokafka's readers are modules; calling again sets the
    limit again)."""
    decoders = {
        "gzip_decode": inflate_within(cramjam.gzip.decompress_into, "gzip", limit),
        "lz4_decode": inflate_within(cramjam.lz4.decompress_into, "lz4", limit),
        "zstd_decode": inflate_within(cramjam.zstd.decompress_into, "zstd", limit),
        "snappy_decode": _snappy_within(limit),
    }
    if not hasattr(codec, "_detect_xerial_stream"):
        raise RuntimeError("aiokafka.codec has no _detect_xerial_stream: aiokafka changed")
    for name in _READERS:
        try:
            reader = importlib.import_module(name)
        except ImportError:  # aiokafka without its compiled readers
            continue
        for decoder, bounded in decoders.items():
            if not hasattr(reader, decoder):
                raise RuntimeError(f"{name} has no {decoder}: aiokafka changed how it inflates")
            setattr(reader, decoder, bounded)
