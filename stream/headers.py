"""The headers a record carries on through every hop (request-id, attempt, traceparent),
and the ones `stream replay` and `stream redrive` add.

An upstream's headers are taken only when they look like what they name: whatever else a
producer sends (null values, megabytes, bytes that are not text) stays behind, so it never
rides along into a paid-for result.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = [
    "HEADER_ATTEMPT",
    "HEADER_REDRIVEN_FROM",
    "HEADER_REPLAYED_FROM",
    "HEADER_REQUEST_ID",
    "HEADER_TRACEPARENT",
    "MAX_HEADER_BYTES",
    "HasHeaders",
    "carried_headers",
    "output_headers",
    "request_id_header",
]


class HasHeaders(Protocol):
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...  # values may be null


HEADER_REQUEST_ID = "request-id"
HEADER_ATTEMPT = "attempt"
HEADER_TRACEPARENT = "traceparent"
# Where a repeated request came from (stream replay, stream redrive): its spend lane.
HEADER_REPLAYED_FROM = "replayed-from"
HEADER_REDRIVEN_FROM = "redriven-from"
# The most of one header value carried on to outputs. A request id is at most 128
# characters (512 bytes of UTF-8) and a W3C traceparent 55: anything bigger is not one,
# and carried along it would make every output (a paid-for result too) that much bigger.
MAX_HEADER_BYTES = 512
_MAX_ATTEMPT_DIGITS = 9


def output_headers(record: HasHeaders, request_id: str | None) -> tuple[tuple[str, bytes], ...]:
    """Headers carried through every hop: request-id, attempt, traceparent (when present).

    Upstream headers are taken only when they look like what they name: a null, oversized
    or non-numeric value is replaced (request-id by the body's, attempt by 1) or dropped,
    and so is a traceparent that is not one (W3C Trace Context).
    """
    incoming = carried_headers(record)
    rid = request_id_header(incoming) or (request_id.encode() if request_id else None)
    headers = [] if rid is None else [(HEADER_REQUEST_ID, rid[:MAX_HEADER_BYTES])]
    attempt = incoming.get(HEADER_ATTEMPT, b"")
    ok = attempt.isdigit() and len(attempt) <= _MAX_ATTEMPT_DIGITS
    headers.append((HEADER_ATTEMPT, attempt if ok else b"1"))
    trace = incoming.get(HEADER_TRACEPARENT)
    if trace is not None and _is_traceparent(trace):
        headers.append((HEADER_TRACEPARENT, trace))
    return tuple(headers)


# W3C Trace Context: version-traceid-parentid-flags, lower-case hex; a later version may add
# fields after a dash (read as version 00's, as the spec asks).
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?", re.S)
_ZEROS = (b"0" * 32, b"0" * 16)


def _is_traceparent(value: bytes) -> bool:
    """Whether `value` is a traceparent a tracer can read: any other is not carried (a
    downstream tracer would reject it, or choke on bytes that are not even text)."""
    found = _TRACEPARENT.fullmatch(value)
    if found is None:
        return False
    version, trace_id, parent_id, more = found.groups()
    if version == b"ff" or trace_id == _ZEROS[0] or parent_id == _ZEROS[1]:
        return False
    return more is None or (version != b"00" and more.isascii() and more.decode().isprintable())


def request_id_header(headers: Mapping[str, bytes]) -> bytes | None:
    """The upstream's request-id, when it is text (UTF-8 without control characters):
    bytes no reader could show or match are not carried, and the body's id stands in."""
    value = headers.get(HEADER_REQUEST_ID)
    if value is None:
        return None
    try:
        return value if value.decode("utf-8").isprintable() else None
    except UnicodeDecodeError:
        return None


def carried_headers(record: HasHeaders) -> dict[str, bytes]:
    """The record's headers that may be carried: no null and no oversized value; the last
    of a repeated header wins."""
    return {
        key: value
        for key, value in record.headers or ()
        if value is not None and len(value) <= MAX_HEADER_BYTES
    }
