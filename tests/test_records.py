"""Decoding never crashes and every record written validates against its schema."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream import compact, records, requestshape
from stream.config import default_topics_dir
from stream.errors import InvalidRecordError, RetryableProviderError
from stream.headers import MAX_HEADER_BYTES
from tests.kit.memory import kept_bytes_each

TOPICS = default_topics_dir()
DECODER = records.Decoder(
    TOPICS / "request.schema.json", max_bytes=4096, known_models=lambda m: m == "known-model"
)
GOOD = {
    "request_id": "r-1",
    "model": "known-model",
    "messages": [{"role": "user", "content": "hi"}],
}


def _schema(name: str) -> jsonschema.Draft7Validator:
    schema = orjson.loads((TOPICS / f"{name}.schema.json").read_bytes())
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def _record(value: bytes | None, headers: tuple[tuple[str, bytes], ...] = ()) -> Any:
    return SimpleNamespace(
        topic="predictions.requests",
        partition=2,
        offset=41,
        timestamp=1_700_000_000_000,
        key=None,
        value=value,
        headers=headers,
    )


def _reason(value: bytes | None) -> str:
    with pytest.raises(InvalidRecordError) as caught:
        DECODER.decode(value, now=time.time())
    return caught.value.reason


@given(
    number=st.integers(-(2**63), 2**64 - 1)
    | st.integers(2**64, 10**40)
    | st.integers(-(10**40), -(2**63) - 1),
    filler=st.text(alphabet="0123456789 ", max_size=40),
    long_run=st.booleans(),
)
def test_an_integer_is_carried_exactly_or_the_request_refused(
    number: int, filler: str, long_run: bool
) -> None:
    # orjson reads an integer beyond 64 bits as a float: such a request is refused, never
    # changed; digits in a prompt are only text (with or without a run long enough to
    # make the decoder read the whole text again).
    text = f"count {filler}" + (" and 123456789012345678901234567890" if long_run else "")
    value = (
        b'{"request_id": "r-1", "model": "known-model", "metadata": {"n": '
        + str(number).encode()
        + b'}, "messages": [{"role": "user", "content": '
        + orjson.dumps(text)
        + b"}]}"
    )
    if -(2**63) <= number < 2**64:
        request = DECODER.decode(value, now=0)
        assert request.metadata == {"n": number} and type(request.metadata["n"]) is int
        assert request.messages[0]["content"] == text
    else:
        assert _reason(value) == "invalid_request"


def test_a_good_request_decodes() -> None:
    request = DECODER.decode(orjson.dumps({**GOOD, "params": {"temperature": 0.2}}), now=0)
    assert request.request_id == "r-1" and request.params == {"temperature": 0.2}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "invalid_request"),
        (b"", "invalid_request"),
        (b"\xff\xfe{", "invalid_encoding"),
        (b'{"request_id": ', "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        (orjson.dumps({**GOOD, "request_id": 7}), "invalid_request"),
        (orjson.dumps({**GOOD, "request_id": "x" * 129}), "invalid_request"),
        (orjson.dumps({**GOOD, "messages": []}), "invalid_request"),
        (orjson.dumps({**GOOD, "deadline": "tomorrow"}), "invalid_request"),
        (orjson.dumps({**GOOD, "model": "nope"}), "unknown_model"),
        (orjson.dumps({**GOOD, "deadline": "2001-01-01T00:00:00Z"}), "expired"),
        (orjson.dumps({**GOOD, "deadline": "2001-01-01t00:00:00z"}), "expired"),  # RFC 3339 too
        (
            orjson.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 5000}]}),
            "too_large",
        ),
    ],
)
def test_bad_input_gets_the_right_reason(value: bytes | None, reason: str) -> None:
    assert _reason(value) == reason


@pytest.mark.parametrize(
    "text", ["2031-05-06T07:08:09Z", "2031-05-06t07:08:09z", "2031-05-06 07:08:09+00:00"]
)
def test_a_deadline_in_any_rfc_3339_spelling_is_read(text: str) -> None:
    body = {**GOOD, "deadline": text}
    assert records.request_of(body).deadline == 1_935_817_689.0  # 2031-05-06 07:08:09 UTC


def test_schema_errors_never_echo_the_prompt() -> None:
    secret = "my private prompt"
    value = orjson.dumps({**GOOD, "messages": [{"role": "boss", "content": secret}]})
    with pytest.raises(InvalidRecordError) as caught:
        DECODER.decode(value, now=0)
    assert secret not in caught.value.message and "role" in caught.value.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_become_a_request_or_a_reason(value: bytes) -> None:
    try:
        DECODER.decode(value, now=0)
    except InvalidRecordError as exc:
        assert exc.reason in _schema("dead-letter").schema["properties"]["reason"]["enum"]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["request_id", "model", "messages", "params", "metadata", "deadline", "extra"]
        ),
        json_values,
    )
)
def test_arbitrary_json_objects_become_a_request_or_a_reason(body: dict[str, Any]) -> None:
    try:
        DECODER.decode(orjson.dumps(body), now=0)
    except InvalidRecordError as exc:
        assert exc.reason in {"invalid_request", "unknown_model", "expired", "too_large"}


# Near-valid requests: a valid one with one or two of its fields set to a value on or past
# an edge of the schema (a length at its limit or over, a bool for a number, an unknown role).
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
    optional={
        "content": st.text(max_size=5) | st.none() | st.lists(json_values, max_size=2),
        "name": st.text(max_size=5),
        "extra": json_values,
    },
)
_valid_requests = st.fixed_dictionaries(
    {
        "request_id": st.text(min_size=1, max_size=128),
        "model": st.text(min_size=1, max_size=200),
        "messages": st.lists(_message, min_size=1, max_size=3),
    },
    optional={
        "params": st.fixed_dictionaries(
            {},
            optional={
                "temperature": st.floats(0, 2) | st.integers(0, 2),
                "top_p": st.floats(0, 1) | st.integers(0, 1),
                "max_tokens": st.integers(1, 10**6),
                "seed": st.integers(-(2**63), 2**63 - 1),
                "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2),
                "reasoning_effort": st.sampled_from(["low", "medium", "high"]),
                "logprobs": json_values,
            },
        ),
        "metadata": st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3),
        "deadline": st.none(),
        "extra": json_values,
    },
)
_edges = (
    st.sampled_from(
        ["", "x" * 128, "x" * 129, "x" * 200, "x" * 201, True, False, 0, 1, 2, 3, -1]
        + [0.5, 1.5, 2.5, 1.0, None, [], {}, "boss", "max", "low", {"type": "text"}]
        + [{"type": "yaml"}, "2026-12-03T12:00:00Z", "yesterday", [{"role": "user"}]]
    )
    | json_values
)
_fields = st.sampled_from(
    ["request_id", "model", "messages", "params", "metadata", "deadline"]
    + [("messages", "role"), ("messages", "content"), ("messages", "name")]
    + [("params", p) for p in ("temperature", "top_p", "max_tokens", "seed", "stop")]
    + [("params", "reasoning_effort"), ("params", "response_format")]
)


@st.composite
def _near_requests(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(_valid_requests)
    for field in draw(st.lists(_fields, min_size=1, max_size=2)):
        value = draw(_edges)
        if isinstance(field, str):
            body[field] = value
        elif field[0] == "messages" and isinstance(body["messages"], list) and body["messages"]:
            first = body["messages"][0]
            if isinstance(first, dict):
                first[field[1]] = value
        elif field[0] == "params":
            params = body.get("params")
            body["params"] = {**(params if isinstance(params, dict) else {}), field[1]: value}
    return body


@settings(max_examples=600, deadline=None)
@given(_near_requests())
def test_the_quick_request_check_passes_only_what_the_schema_passes(body: dict[str, Any]) -> None:
    # The quick check may send a valid body on to the compiled schema (False is no
    # verdict), but what it passes the schema must pass: it is the only check such a
    # body gets. jsonschema, the reference implementation, judges.
    if requestshape.plain_request(body):
        assert _schema("request").is_valid(body), body


def test_the_quick_request_check_passes_the_usual_requests() -> None:
    usual = [
        GOOD,
        {**GOOD, "metadata": {"order": 7}, "deadline": None},
        {**GOOD, "params": {"temperature": 0.2, "max_tokens": 512, "stop": ["\n"], "seed": 1}},
        {**GOOD, "messages": [{"role": "system", "content": "be brief"}, *GOOD["messages"]]},
    ]
    assert all(requestshape.plain_request(body) for body in usual)


def test_the_quick_request_check_is_for_the_shipped_schema_alone(tmp_path: Any) -> None:
    # The shipped schema has the fingerprint the check was written for (changing the
    # schema fails this: check plain_request against it, then take the new fingerprint).
    shipped = TOPICS / "request.schema.json"
    assert requestshape.schema_fingerprint(shipped) == requestshape.PLAIN_SCHEMA
    # A schema of an operator's that is stricter gets its own compiled check alone (a
    # field named like an annotation too: the fingerprint strips nothing).
    schema = orjson.loads(shipped.read_bytes())
    schema["properties"]["description"] = {"type": "string", "maxLength": 4}
    stricter = tmp_path / "request.schema.json"
    stricter.write_bytes(orjson.dumps(schema))
    decoder = records.Decoder(stricter, max_bytes=4096, known_models=lambda m: True)
    body = {**GOOD, "description": "longer than 4"}
    assert requestshape.plain_request(body)
    with pytest.raises(InvalidRecordError, match="description must be shorter"):
        decoder.decode(orjson.dumps(body), now=0)
    # The shipped schema spaced and ordered otherwise is the same schema.
    same = dict(reversed(orjson.loads(shipped.read_bytes()).items()))
    stricter.write_bytes(orjson.dumps(same, option=orjson.OPT_INDENT_2))
    assert requestshape.schema_fingerprint(stricter) == requestshape.PLAIN_SCHEMA


def test_dead_letter_of_undecodable_input_keeps_the_original_bytes() -> None:
    original = b"\xff not json"
    letter = orjson.loads(
        records.dead_letter(
            _record(original), reason="invalid_encoding", error="not UTF-8", stage="primary"
        )
    )
    _schema("dead-letter").validate(letter)
    assert base64.b64decode(letter["raw"]) == original
    assert letter["request"] is None
    assert letter["source"] == {
        "topic": "predictions.requests",
        "partition": 2,
        "offset": 41,
        "timestamp": 1_700_000_000_000,
    }


def test_dead_letter_of_a_parsed_request_keeps_the_request_and_failures() -> None:
    failure = records.failure_of(
        RetryableProviderError(
            "503 from provider",
            provider="together",
            model="m",
            status=503,
            error_type="server_error",
            attempts=3,
        )
    )
    letter = orjson.loads(
        records.dead_letter(
            _record(b"{}"),
            reason="fallback_failed",
            error="both failed",
            stage="fallback",
            request=GOOD,
            failures=[failure, failure],
        )
    )
    _schema("dead-letter").validate(letter)
    assert letter["request"] == GOOD and letter["raw"] is None
    assert letter["request_id"] == "r-1" and len(letter["failures"]) == 2


def _result(request: records.Request) -> bytes:
    return records.result_record(
        request.held(),
        provider="synthetic",
        provider_model="hf:x/y",
        content="hello",
        reasoning=None,
        usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        attempts=1,
        latency_ms=12.5,
        fallback=False,
    )


def test_result_and_fallback_records_validate() -> None:
    request = DECODER.decode(orjson.dumps({**GOOD, "metadata": {"team": "a"}}), now=0)
    result = orjson.loads(_result(request))
    _schema("result").validate(result)
    assert result["metadata"] == {"team": "a"}
    failure = records.failure_of(
        RetryableProviderError(
            "timeout", provider="synthetic", model="hf:x/y", error_type="timeout", attempts=4
        )
    )
    forwarded = orjson.loads(records.fallback_record(request.body, failure))
    _schema("fallback").validate(forwarded)
    _schema("request").validate(forwarded)  # a fallback record is still a request


def test_headers_carry_request_id_attempt_and_traceparent() -> None:
    trace = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    record = _record(b"{}", headers=(("traceparent", trace), ("attempt", b"2"), ("other", b"x")))
    assert dict(records.output_headers(record, "r-9")) == {
        "request-id": b"r-9",
        "attempt": b"2",
        "traceparent": trace,
    }
    assert dict(records.output_headers(_record(b"{}"), None)) == {"attempt": b"1"}


def test_headers_that_are_null_oversized_or_not_numbers_are_not_carried() -> None:
    huge = b"r" * (1024 * 1024)
    for request_id, attempt, trace in [(None, None, None), (huge, b"2" * 20, huge)]:
        headers = (("request-id", request_id), ("attempt", attempt), ("traceparent", trace))
        record = _record(b"{bad", headers=headers)  # type: ignore[arg-type]
        assert dict(records.output_headers(record, "r-9")) == {
            "request-id": b"r-9",
            "attempt": b"1",
        }
        letter = orjson.loads(
            records.dead_letter(record, reason="invalid_json", error="x", stage="primary")
        )
        assert letter["request_id"] is None


@pytest.mark.parametrize(
    ("trace", "carried"),
    [
        (b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        (b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", True),
        (b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later", True),
        (b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x", False),
        (b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", False),
        (b"00-00000000000000000000000000000000-b7ad6b7169203331-01", False),
        (b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", False),
        (b"00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01", False),
        (b"zz-garbage-\xff", False),
        (b"\xff\xfe", False),
        (b"", False),
        (b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n", False),
        (b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-a\x00b", False),
    ],
)
def test_only_a_traceparent_a_tracer_can_read_is_carried(trace: bytes, carried: bool) -> None:
    """A hostile upstream's garbage (bytes that are not even text) rode along onto every
    result; W3C Trace Context says what one looks like."""
    record = _record(b"{}", headers=(("traceparent", trace),))
    assert ("traceparent" in dict(records.output_headers(record, "r"))) is carried


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["request-id", "attempt", "traceparent", "x"]) | st.text(max_size=4),
            st.none() | st.binary(max_size=8) | st.integers(0, 3000).map(lambda n: b"7" * n),
        ),
        max_size=6,
    ),
    st.none() | st.text(max_size=200),
)
def test_output_headers_are_always_small_bytes(
    headers: list[tuple[str, bytes | None]], request_id: str | None
) -> None:
    record = _record(b"{}", headers=tuple(headers))  # type: ignore[arg-type]
    carried = records.output_headers(record, request_id)
    assert [key for key, _ in carried][:1] in (["request-id"], ["attempt"])
    assert all(isinstance(v, bytes) and len(v) <= MAX_HEADER_BYTES for _, v in carried)
    assert dict(carried)["attempt"].isdigit()
    letter = orjson.loads(records.dead_letter(record, reason="x", error="x", stage="primary"))
    assert letter["request_id"] is None or len(letter["request_id"]) <= 128


def test_the_key_counts_towards_the_size_limit() -> None:
    value = orjson.dumps(GOOD)
    assert DECODER.decode(value, now=0, key=b"k" * (4096 - len(value))).request_id == "r-1"
    with pytest.raises(InvalidRecordError) as caught:
        DECODER.decode(value, now=0, key=b"k" * (4097 - len(value)))
    assert caught.value.reason == "too_large" and "of them the key" in caught.value.message


@pytest.mark.parametrize(
    "body",
    [{**GOOD, "model": "nope"}, {**GOOD, "deadline": "2001-01-01T00:00:00+00:00"}],
)
def test_requests_that_parsed_travel_with_their_rejection(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRecordError) as caught:
        DECODER.decode(orjson.dumps(body), now=time.time())
    assert caught.value.request == body


def test_written_records_hold_no_more_memory_than_their_length() -> None:
    # orjson returns its 4 KiB working buffer as the bytes: a result waiting for the
    # broker's acknowledgement would hold 4 KiB however short (40 MB per 10,000 in flight).
    request = DECODER.decode(orjson.dumps(GOOD), now=0)
    failure = {"error_type": "timeout", "status": None, "attempts": 1}

    def written() -> list[bytes]:
        return [_result(request), records.fallback_record(request.body, failure)]

    assert kept_bytes_each(written) < 2 * max(len(b) for b in written())


def test_compact_json_is_the_same_json_in_bytes_of_its_own_size() -> None:
    value = {"model": "hf:x/y", "messages": [{"role": "user", "content": "hi"}]}
    assert compact.dumps(value) == orjson.dumps(value)
    assert kept_bytes_each(lambda: [compact.dumps(value)]) < 2 * len(orjson.dumps(value)) + 100
    assert kept_bytes_each(lambda: [orjson.dumps(value)]) > 4000  # why compact exists


@given(st.floats(min_value=-6.2e10, max_value=2.5e11, allow_nan=False, allow_infinity=False))
def test_timestamps_are_written_as_datetime_writes_them(at: float) -> None:
    # The text up to the seconds is kept between calls: a stamp must not come out with a
    # second it kept for another moment, nor round the fraction another way.
    expected = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
    assert records.now_rfc3339(at) == expected.replace("+00:00", "Z")
    assert records.now_rfc3339(at + 1) == (
        datetime.fromtimestamp(at + 1, UTC).isoformat(timespec="milliseconds")
    ).replace("+00:00", "Z")


def test_now_is_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = datetime.fromisoformat(records.now_rfc3339())
    assert before <= stamp <= datetime.now(UTC)
