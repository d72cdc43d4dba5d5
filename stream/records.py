"""The records the pipeline reads and writes, and the one way each is made.

Decoding is where hostile input meets the system, so it never raises anything but
`InvalidRecordError`, whose `reason` is a dead-letter reason: a record that cannot become
a request becomes a dead letter carrying its original bytes, never a crash or a loss.
Every record written is built here, so it validates against its schema in topics/.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import fastjsonschema
import orjson

from stream import compact
from stream.errors import InvalidRecordError, ProviderError
from stream.headers import (
    HEADER_ATTEMPT,
    HEADER_REDRIVEN_FROM,
    HEADER_REPLAYED_FROM,
    HEADER_REQUEST_ID,
    HEADER_TRACEPARENT,
    carried_headers,
    output_headers,
    request_id_header,
)
from stream.requestshape import PLAIN_SCHEMA, fingerprint_of, plain_request

__all__ = [
    "Held",
    "HEADER_ATTEMPT",
    "HEADER_REDRIVEN_FROM",
    "HEADER_REPLAYED_FROM",
    "HEADER_REQUEST_ID",
    "HEADER_TRACEPARENT",
    "Decoder",
    "Request",
    "SourceRecord",
    "check_deadline",
    "dead_letter",
    "failure_of",
    "fallback_record",
    "now_rfc3339",
    "output_headers",
    "request_of",
    "result_record",
]


Validator = Callable[[Any], Any]


class SourceRecord(Protocol):
    """What we need of an input record (aiokafka's ConsumerRecord has it)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]  # Kafka header values may be null


@dataclass(frozen=True, slots=True)
class Request:
    """A request that passed validation; `body` is the parsed JSON, echoed on as it came."""

    request_id: str
    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    metadata: dict[str, Any] | None
    deadline: float | None  # epoch seconds
    body: dict[str, Any]

    def held(self) -> Held:
        """What a result needs of the request: kept while its call is out, in place of the
        whole request (whose prompt the call's body already holds once)."""
        return Held(self.request_id, self.model, self.metadata)


class Held(NamedTuple):
    """The request's part a result echoes."""

    request_id: str
    model: str
    metadata: dict[str, Any] | None


def now_rfc3339(at: float | None = None) -> str:
    """`at` (epoch seconds; default now) as RFC 3339 UTC to the millisecond, as
    `datetime.isoformat` writes it ("2026-11-30T14:32:23.123Z").

    The text up to the seconds is kept for the second it names, and the milliseconds are
    a table's: every record written carries a stamp, and a datetime formatted each time
    was ~2 % of a worker's CPU (now: 0.2 µs, 1.6 with the fraction formatted each time)."""
    global _second_text
    if at is None:
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        millis = nanos // 1_000_000
    else:
        fraction, whole = math.modf(at)
        second, micros = divmod(int(whole) * 1_000_000 + round(fraction * 1e6), 1_000_000)
        millis = micros // 1000
    cached_second, text = _second_text
    if second != cached_second:
        text = datetime.fromtimestamp(second, UTC).isoformat()[:19]  # a 4-digit year
        _second_text = (second, text)
    return text + _MILLIS[millis]


_second_text: tuple[int, str] = (0, "1970-01-01T00:00:00")  # the last second written
_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))


def load_validator(schema: Any) -> Validator:
    """Compile a (parsed) JSON Schema from topics/ once; validation then costs microseconds."""
    validator: Validator = fastjsonschema.compile(schema)
    return validator


class Decoder:
    """Bytes → `Request`, or `InvalidRecordError` with the dead-letter reason."""

    def __init__(self, schema: Path, *, max_bytes: int, known_models: Callable[[str], bool]):
        parsed = orjson.loads(schema.read_bytes())
        self._validate = load_validator(parsed)
        # The request schema as shipped: most bodies pass a check of a few look-ups first.
        self._plain = plain_request if fingerprint_of(parsed) == PLAIN_SCHEMA else None
        self._max_bytes = max_bytes
        self._known = known_models

    def decode(self, value: bytes | None, *, now: float, key: bytes | None = None) -> Request:
        return self.request(self.parse(value, key=key), now=now)

    def request(self, body: dict[str, Any], *, now: float) -> Request:
        """A parsed body → `Request`: a model in the catalog, a deadline not passed."""
        request = request_of(body)
        if not self._known(request.model):
            raise InvalidRecordError(
                "unknown_model", f"model {request.model!r} is not in the catalog", request=body
            )
        check_deadline(request, now)
        return request

    def parse(self, value: bytes | None, *, key: bytes | None = None) -> dict[str, Any]:
        """Bytes → schema-valid JSON object (no catalog or deadline checks). The key counts
        towards the size limit: every output of the record carries it."""
        if not value:
            raise InvalidRecordError("invalid_request", "the record has no value")
        size = len(value) + len(key or b"")
        if size > self._max_bytes:
            of = f" ({len(key or b'')} of them the key)" if key else ""
            raise InvalidRecordError(
                "too_large", f"{size} bytes{of} is over the {self._max_bytes}-byte limit"
            )
        try:
            body = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise _undecodable(value, exc) from None
        try:
            if self._plain is None or not self._plain(body):
                self._validate(body)
        except fastjsonschema.JsonSchemaValueException as exc:
            # The message names the field and the rule, never the value (it may be a prompt).
            raise InvalidRecordError("invalid_request", exc.message) from None
        _check_writable(body, value)
        check_exact(value)
        return body  # type: ignore[no-any-return]


# Fewer `{` and `[` in the whole text than this, and the body cannot be nested too deep.
_SHALLOW = 200
# orjson reads an integer as an int from -2**63 to 2**64 - 1, and one beyond as a float.
_INT_RANGE = range(-(2**63), 2**64)
# Beyond that range: 20 digits or more, or a minus and 19 or more; both hold a run of 19,
# which is what is searched for (an alternation of the two runs cost twice one search: a
# UUID request id has 19 digits in all about as often as not). A run of 19 that is in
# range (rare) is read again for nothing, and passes.
_LONG_NUMBER = re.compile(rb"[0-9]{19}")
# Everything but the digits: a text with fewer than 19 digits in all has no such run, and
# counting them (bytes.translate) costs a tenth of the search's ~1 µs.
_NOT_DIGITS = bytes(b for b in range(256) if not 0x30 <= b <= 0x39)


class _Inexact(Exception):
    pass


def _exact_int(literal: str) -> int:
    number = int(literal)
    if number not in _INT_RANGE:
        raise _Inexact
    return number


def check_exact(text: bytes) -> None:
    """An integer beyond 64 bits would not come back as sent: orjson reads it as a float,
    so an order id of 123456789012345678901 in `metadata` would be written in the result
    as 1.2345678901234568e+20. Such a request is refused, saying how to send it, rather
    than changed. Only a text with a run of 19 or 20 digits can hold one (digits in a
    prompt too: those are read again, by the standard parser, which keeps integers whole)."""
    if len(text.translate(None, _NOT_DIGITS)) < 19 or _LONG_NUMBER.search(text) is None:
        return
    try:
        json.loads(text, parse_int=_exact_int)
    except (ValueError, RecursionError):
        return  # what orjson read and this parser cannot: nothing to compare with
    except _Inexact:
        raise InvalidRecordError(
            "invalid_request",
            "an integer beyond 64 bits would not be carried exactly (it would become a "
            "float): send it as a string",
        ) from None


def _check_writable(body: Any, text: bytes) -> None:
    """orjson reads 1024 levels of nesting but writes only 254: a request deeper than that
    would pass, be paid for at the provider, and then fail to become a result or a dead
    letter. Dumped one level down, as a dead letter holds it under `request` (only when it
    could be that deep: each level opens with a bracket, and counting them is cheap)."""
    if text.count(b"{") + text.count(b"[") < _SHALLOW:
        return
    try:
        orjson.dumps({"request": body})
    except orjson.JSONEncodeError as exc:
        raise InvalidRecordError(
            "invalid_request", f"the request cannot be written back ({exc}: nested too deep)"
        ) from None


def _undecodable(value: bytes, exc: orjson.JSONDecodeError) -> InvalidRecordError:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as bad:
        return InvalidRecordError("invalid_encoding", f"not UTF-8 (byte {bad.start})")
    return InvalidRecordError("invalid_json", f"not JSON ({exc.msg} at char {exc.pos})")


def check_deadline(request: Request, now: float) -> None:
    if request.deadline is not None and request.deadline <= now:
        raise InvalidRecordError(
            "expired", f"deadline {request.body['deadline']} has passed", request=request.body
        )


def request_of(body: dict[str, Any]) -> Request:
    """A `Request` from a schema-valid body."""
    deadline = body.get("deadline")
    when = None
    if deadline is not None:
        try:
            # RFC 3339 allows a lower-case "t" and "z"; Python 3.11 reads only upper case
            parsed = datetime.fromisoformat(deadline.upper())
        except ValueError:
            raise InvalidRecordError("invalid_request", "deadline is not RFC 3339") from None
        when = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return Request(
        request_id=body["request_id"],
        model=body["model"],
        messages=body["messages"],
        params=body.get("params") or {},
        metadata=body.get("metadata"),
        deadline=when,
        body=body,
    )


def result_record(
    request: Held,
    *,
    provider: str,
    provider_model: str,
    content: str | None,
    reasoning: str | None,
    usage: Mapping[str, Any] | None,
    attempts: int,
    latency_ms: float,
    fallback: bool,
    finish_reason: str | None = None,
    tool_calls: Sequence[Any] | None = None,
    provider_request_id: str | None = None,
    cost_usd: float | None = None,
) -> bytes:
    return compact.dumps(
        {
            "request_id": request.request_id,
            "model": request.model,
            "provider": provider,
            "provider_model": provider_model,
            "fallback": fallback,
            "content": content,
            "reasoning": reasoning,
            "usage": dict(usage) if usage is not None else None,
            "attempts": attempts,
            "latency_ms": round(latency_ms, 3),
            "completed_at": now_rfc3339(),
            "metadata": request.metadata,
            "finish_reason": finish_reason,
            "truncated": finish_reason == "length",
            "tool_calls": list(tool_calls) if tool_calls is not None else None,
            "provider_request_id": provider_request_id,
            "cost_usd": _usd(cost_usd),
        }
    )


def _usd(cost: float | None) -> float | None:
    # Micro-dollars are below any bill's resolution; fewer digits, same sums.
    return None if cost is None else round(cost, 9)


def failure_of(exc: ProviderError, *, attempts: int | None = None) -> dict[str, Any]:
    """The `failure` object records carry for a provider error."""
    return failure(
        provider=exc.provider,
        model=exc.model,
        status=exc.status,
        error_type=exc.error_type,
        message=exc.message,
        attempts=exc.attempts if attempts is None else attempts,
        provider_request_id=exc.provider_request_id,
        cost_usd=exc.cost_usd,
    )


def failure(
    *,
    provider: str,
    model: str,
    status: int | None,
    error_type: str,
    message: str,
    attempts: int,
    provider_request_id: str | None,
    cost_usd: float | None,
) -> dict[str, Any]:
    """The `failure` object: also for an answer that was paid for and could not be kept."""
    return {
        "provider": provider,
        "model": model,
        "status": status,
        "error_type": error_type,
        "message": message[:500],
        "attempts": attempts,
        "failed_at": now_rfc3339(),
        "provider_request_id": provider_request_id,
        "cost_usd": _usd(cost_usd),
    }


def fallback_record(body: dict[str, Any], failure: dict[str, Any]) -> bytes:
    """The request as it came (`body`), with the failure that sends it to the fallback."""
    return compact.dumps({**body, "failure": failure})


def dead_letter(
    record: SourceRecord,
    *,
    reason: str,
    error: str,
    stage: str,
    request: dict[str, Any] | None = None,
    failures: Sequence[dict[str, Any]] = (),
    carry: bool = True,
) -> bytes:
    """A dead letter: the request when it parsed, else the original bytes (base64). Without
    `carry` (the whole would be too large to write), neither: `omitted` says how many
    bytes the input's value and key had, and `source` where they still are."""
    raw = None
    if carry and request is None and record.value is not None:
        raw = base64.b64encode(record.value).decode("ascii")
    extra: dict[str, Any] = {}
    if not carry:
        extra["omitted"] = {
            "value_bytes": len(record.value or b""),
            "key_bytes": len(record.key or b""),
        }
    return compact.dumps(
        {
            "reason": reason,
            "error": error[:1000],
            "stage": stage,
            "request_id": _request_id(request, record),
            "request": request if carry else None,
            "raw": raw,
            "source": {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "timestamp": record.timestamp
                if record.timestamp is not None and record.timestamp >= 0
                else None,
            },
            "failures": list(failures),
            "dead_at": now_rfc3339(),
            **extra,
        }
    )


def _request_id(request: dict[str, Any] | None, record: SourceRecord) -> str | None:
    if request is not None and isinstance(request.get("request_id"), str):
        return str(request["request_id"])
    value = request_id_header(carried_headers(record))
    return None if value is None else value.decode()[:128]
