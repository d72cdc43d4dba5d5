"""Hostile input through the real stages: every record becomes exactly one output that
validates against its topic's schema, and no exception escapes (the engine's `on_error`
is for bugs, never for bad input).

The provider is a fake that answers at once (or fails, by the prompt), so thousands of
examples run in seconds; what is under test is decoding, validation and record building.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import anyio
import jsonschema
import orjson
import pytest
from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.catalog import Model, load_catalog
from stream.config import Secret, Settings
from stream.engine.engine import Output
from stream.engine.fetch import StandIn, Undecodable
from stream.errors import RetryableProviderError
from stream.providers import Completion
from stream.stages import FallbackStage, PrimaryStage

_BASE = Settings(max_request_bytes=64 * 1024)
# A Together key, so mapped models really fall back (else they dead-letter as unconfigured).
SETTINGS = replace(_BASE, together=replace(_BASE.together, api_key=Secret("k")))
CATALOG = load_catalog(SETTINGS)
MODELS = ["deepseek-r1-0528-syn", "kimi-k2-thinking-syn", "glm-4.6-syn", "deepseek-r1", "nope"]
SCHEMAS = {
    name: jsonschema.Draft7Validator(
        orjson.loads((SETTINGS.topics_dir / f"{name}.schema.json").read_bytes()),
        format_checker=jsonschema.FormatChecker(),
    )
    for name in ("result", "dead-letter", "fallback")
}


class FakeClient:
    """Answers every call, echoing nothing of the request; a prompt with 'fail' fails."""

    calls = 0

    def __init__(self, content: str = "ok") -> None:
        self.content = content

    async def complete(
        self, model: Model, messages: list[dict[str, Any]], params: Any = None, **_: Any
    ) -> Completion:
        FakeClient.calls += 1
        if "fail" in repr(messages):
            raise RetryableProviderError(
                "HTTP 503: down", provider=model.provider, model=model.api_model, status=503
            )
        return Completion(
            content=self.content,
            reasoning=None,
            usage=None,
            provider=model.provider,
            provider_model=model.api_model,
            attempts=1,
            latency_ms=1.0,
        )


PRIMARY = PrimaryStage(SETTINGS, CATALOG, {"synthetic": FakeClient(), "together": FakeClient()})  # type: ignore[dict-item]
FALLBACK = FallbackStage(SETTINGS, CATALOG, FakeClient())  # type: ignore[arg-type]


def _record(
    value: bytes | None,
    topic: str,
    headers: tuple[tuple[str, bytes | None], ...] = (),
    key: bytes | None = None,
) -> Any:
    return SimpleNamespace(
        topic=topic, partition=0, offset=7, timestamp=1, key=key, value=value, headers=headers
    )


def _kind(output: Output) -> str:
    return output.topic.rpartition(".")[2].replace("results", "result")


def _run(
    stage: PrimaryStage | FallbackStage,
    value: bytes | None,
    topic: str,
    headers: tuple[tuple[str, bytes | None], ...] = (),
    key: bytes | None = None,
) -> dict[str, Any]:
    outputs = anyio.run(stage.handle, _record(value, topic, headers, key))
    assert len(outputs) == 1
    (output,) = outputs
    assert all(len(v) <= 512 for _, v in output.headers)  # nothing big rides along
    body = orjson.loads(output.value)
    SCHEMAS[_kind(output)].validate(body)
    if _kind(output) == "dead-letter" and body["request"] is None and value is not None:
        assert body["raw"] is not None  # what did not parse travels as its bytes
    return body


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", "boss"]),
            "content": st.text(max_size=30) | st.sampled_from(["fail", "hi"]) | json_values,
        },
    )
    | json_values,
    max_size=3,
)
near_valid = st.fixed_dictionaries(
    {
        "request_id": st.text(max_size=140) | json_values,
        "model": st.sampled_from(MODELS) | json_values,
        "messages": messages,
    },
    optional={
        "params": st.dictionaries(
            st.sampled_from(
                ["temperature", "max_tokens", "stream", "model", "response_format", "x"]
            ),
            json_values,
        )
        | json_values,
        "metadata": st.dictionaries(st.text(max_size=6), json_values) | json_values,
        "deadline": st.sampled_from(
            [
                "2099-01-01T00:00:00Z",
                "2001-01-01T00:00:00Z",
                "0001-01-01T00:00:00+01:00",
                "9999-12-31T23:59:59-23:59",
                "2099-02-30T00:00:00Z",
                "tomorrow",
                "2099-01-01",
            ]
        )
        | json_values,
        "extra": json_values,
    },
)


def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"a": value}
    return value


GOOD = {
    "request_id": "r-1",
    "model": "glm-4.6-syn",
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"\xff\xfe",
        b"[" * 5000 + b"]" * 5000,  # past the parser's depth limit
        orjson.dumps({**GOOD, "metadata": _deep(200)}),  # parses, and can be written back
        b'{"request_id": "r", "model": "glm-4.6-syn", "metadata": '
        + b'{"a":' * 300
        + b"1"
        + b"}" * 300
        + b', "messages": [{"role": "user", "content": "x"}]}',
        b'{"request_id": "r", "model": "glm-4.6-syn", "messages": [{"role": "user", '
        b'"content": "\\ud800"}]}',  # a lone surrogate escape
        b'{"request_id": "r", "model": "glm-4.6-syn", "metadata": {"n": NaN}, "messages": []}',
        b'{"request_id": "r", "model": "glm-4.6-syn", "metadata": {"n": 1e999}, "messages": []}',
        b'{"request_id": "\\u0000\\n", "model": "glm-4.6-syn", '
        b'"messages": [{"role": "user", "content": "x"}]}',
        b'{"request_id": "r", "request_id": 5, "model": "glm-4.6-syn", '
        b'"messages": [{"role": "user", "content": "x"}]}',  # duplicate keys: the last wins
        b'{"request_id": "r", "model": "glm-4.6-syn", "metadata": {"big": 18446744073709551616}, '
        b'"messages": [{"role": "user", "content": "x"}]}',  # parsed as a float
        orjson.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 70_000}]}),
    ],
)
@pytest.mark.parametrize("stage", ["primary", "fallback"])
def test_hostile_records_become_one_valid_output(value: bytes | None, stage: str) -> None:
    if stage == "primary":
        _run(PRIMARY, value, "predictions.requests")
    else:
        _run(FALLBACK, value, "predictions.fallback")


def test_a_request_too_deep_to_write_back_is_rejected_before_the_provider_is_paid() -> None:
    value = orjson.dumps({**GOOD, "request_id": "deep"})[:-1] + b', "metadata": '
    value += b'{"a":' * 300 + b"1" + b"}" * 300 + b"}"
    before = FakeClient.calls
    letter = _run(PRIMARY, value, "predictions.requests")
    assert letter["reason"] == "invalid_request" and "nest" in letter["error"]
    assert FakeClient.calls == before  # no call paid for a result that could not be written


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid)
def test_near_valid_requests_through_the_primary_stage(body: dict[str, Any]) -> None:
    _run(PRIMARY, orjson.dumps(body), "predictions.requests")


failures = (
    st.fixed_dictionaries(
        {
            "provider": st.sampled_from(["synthetic", "together"]) | json_values,
            "model": st.text(max_size=10),
            "status": st.none() | st.integers(100, 599),
            "error_type": st.text(max_size=10),
            "message": st.text(max_size=30),
            "attempts": st.integers(0, 10) | json_values,
            "failed_at": st.just("2026-01-01T00:00:00Z"),
        }
    )
    | json_values
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid, failures)
def test_near_valid_fallback_records_through_the_fallback_stage(
    body: dict[str, Any], failure: Any
) -> None:
    _run(FALLBACK, orjson.dumps({**body, "failure": failure}), "predictions.fallback")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_through_both_stages(value: bytes) -> None:
    _run(PRIMARY, value, "predictions.requests")
    _run(FALLBACK, value, "predictions.fallback")


def test_the_fuzz_reaches_the_provider_and_the_fallback() -> None:
    """Guard against a generator that only ever makes dead letters."""
    body = {**GOOD, "model": "deepseek-r1-0528-syn"}
    assert "provider" in _run(PRIMARY, orjson.dumps(body), "predictions.requests")
    failing = {**body, "messages": [{"role": "user", "content": "fail"}]}
    forwarded = _run(PRIMARY, orjson.dumps(failing), "predictions.requests")
    assert forwarded["failure"]["status"] == 503
    assert (
        _run(
            FALLBACK,
            orjson.dumps({**body, "failure": forwarded["failure"]}),
            "predictions.fallback",
        )["fallback"]
        is True
    )


@pytest.mark.parametrize(
    ("results_max", "content", "key", "kind"),
    [
        (1_048_588, 1_000_000, None, "result"),
        (1_048_588, 1_000_000, b"k" * 60_000, "dead-letter"),  # the key counts too
        (1_048_588, 1_100_000, None, "dead-letter"),
        # a topic raised past what the worker's producer sends: the producer's cap rules
        (8_388_608, 3_000_000, None, "dead-letter"),
        (8_388_608, 2_000_000, None, "result"),
    ],
)
def test_a_result_is_written_only_when_kafka_will_take_it(
    tmp_path: Any, results_max: int, content: int, key: bytes | None, kind: str
) -> None:
    for source in SETTINGS.topics_dir.iterdir():
        text = source.read_text()
        if source.name == "results.toml":
            text = text.replace('"1048588"', f'"{results_max}"')
        (tmp_path / source.name).write_text(text)
    settings = replace(SETTINGS, topics_dir=tmp_path)
    stage = PrimaryStage(settings, CATALOG, {"synthetic": FakeClient("x" * content)})  # type: ignore[dict-item]
    value = orjson.dumps(
        {"request_id": "r", "model": "glm-4.6-syn", "messages": [{"role": "user", "content": "hi"}]}
    )
    record = _record(value, "predictions.requests")
    record.key = key
    [output] = anyio.run(stage.handle, record)
    assert _kind(output) == kind
    if kind == "dead-letter":
        letter = orjson.loads(output.value)
        assert letter["reason"] == "result_too_large" and letter["request"]["request_id"] == "r"
        SCHEMAS["dead-letter"].validate(letter)  # with the paid answer's failure
        assert letter["failures"][-1]["error_type"] == "result_too_large"
    else:
        assert len(output.value) > content


FAILURE = {
    "provider": "synthetic",
    "model": "m",
    "status": 503,
    "error_type": "server_error",
    "message": "down",
    "attempts": 1,
    "failed_at": "2026-01-01T00:00:00Z",
}
header_values = (
    st.none()
    | st.binary(max_size=10)
    | st.sampled_from([b"2", b"-1", b"99999999999999999999", b"\xff"])
    | st.integers(513, 2 * 1024 * 1024).map(lambda n: b"h" * n)
)
hostile_headers = st.lists(
    st.tuples(
        st.sampled_from(["request-id", "attempt", "traceparent"]) | st.text(max_size=5),
        header_values,
    ),
    max_size=5,
).map(tuple)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid, hostile_headers, st.none() | st.binary(max_size=20))
def test_hostile_headers_and_keys_through_both_stages(
    body: dict[str, Any], headers: tuple[tuple[str, bytes | None], ...], key: bytes | None
) -> None:
    _run(PRIMARY, orjson.dumps(body), "predictions.requests", headers, key)
    failure = FAILURE
    _run(FALLBACK, orjson.dumps({**body, "failure": failure}), "predictions.fallback", headers)


@pytest.mark.parametrize(
    ("headers", "carried_id"),
    [
        ((("request-id", None),), b"r-1"),  # a null value
        ((("attempt", None), ("request-id", b"up-1")), b"up-1"),
        ((("request-id", b"x" * 1024 * 1024), ("traceparent", b"t" * 1024 * 1024)), b"r-1"),
        ((("request-id", b"\xff\xfe\x00"),), b"r-1"),  # not UTF-8: the body's id stands in
        ((("request-id", b"up\n1"),), b"r-1"),  # a control character
    ],
)
def test_odd_headers_on_a_valid_request_cost_one_call_and_give_a_result(
    headers: tuple[tuple[str, bytes | None], ...], carried_id: bytes
) -> None:
    body = {**GOOD, "request_id": "r-1"}
    before = FakeClient.calls
    [output] = anyio.run(
        PRIMARY.handle, _record(orjson.dumps(body), "predictions.requests", headers)
    )
    assert _kind(output) == "result" and FakeClient.calls == before + 1
    assert dict(output.headers) == {"request-id": carried_id, "attempt": b"1"}


@pytest.mark.parametrize("attempts", [1001, 2**63 - 1, 2**64 - 1])
def test_a_fallback_record_with_an_impossible_attempt_count_is_not_run(attempts: int) -> None:
    """A neighbour's count would otherwise overflow the result after the answer was paid
    for, and the handler error would be re-driven: paid twice."""
    before = FakeClient.calls
    value = orjson.dumps({**GOOD, "failure": {**FAILURE, "attempts": attempts}})
    letter = _run(FALLBACK, value, "predictions.fallback")
    assert letter["reason"] == "invalid_request" and "attempts" in letter["error"]
    assert FakeClient.calls == before


def test_an_unknown_model_on_the_fallback_topic_is_an_unknown_model() -> None:
    value = orjson.dumps({**GOOD, "model": "nope", "failure": FAILURE})
    letter = _run(FALLBACK, value, "predictions.fallback")
    assert letter["reason"] == "unknown_model"


def test_a_null_request_id_header_on_bad_json_is_a_dead_letter() -> None:
    letter = _run(PRIMARY, b"{bad\n", "predictions.requests", (("request-id", None),))
    assert letter["reason"] == "invalid_json" and letter["request_id"] is None


def test_a_key_too_big_to_carry_is_too_large_before_the_provider_is_paid() -> None:
    before = FakeClient.calls
    key = b"k" * SETTINGS.max_request_bytes
    letter = _run(PRIMARY, orjson.dumps(GOOD), "predictions.requests", key=key)
    assert letter["reason"] == "too_large" and FakeClient.calls == before


def test_handler_errors_keep_the_request_so_they_can_be_re_driven() -> None:
    failure = FAILURE
    cases = [
        (PRIMARY, orjson.dumps(GOOD), [], "predictions.requests"),
        (FALLBACK, orjson.dumps({**GOOD, "failure": failure}), [failure], "predictions.fallback"),
    ]
    for stage, value, failures, topic in cases:
        [output] = stage.on_error(_record(value, topic), TypeError("a bug"))
        letter = orjson.loads(output.value)
        SCHEMAS["dead-letter"].validate(letter)
        assert letter["reason"] == "handler_error" and letter["error"] == "TypeError: a bug"
        assert letter["request"] == GOOD and letter["raw"] is None
        assert letter["failures"] == failures and letter["request_id"] == GOOD["request_id"]
    [output] = PRIMARY.on_error(_record(b"{bad", "predictions.requests"), TypeError("a bug"))
    letter = orjson.loads(output.value)
    assert letter["request"] is None and base64.b64decode(letter["raw"]) == b"{bad"


def test_a_record_the_kafka_client_cannot_decode_is_an_invalid_encoding_dead_letter() -> None:
    [stand_in] = StandIn.each_of(
        Undecodable(TopicPartition("predictions.requests", 3), 41, "a header key is not UTF-8")
    )
    [output] = PRIMARY.on_error(stand_in, stand_in.error)
    letter = orjson.loads(output.value)
    SCHEMAS["dead-letter"].validate(letter)
    assert letter["reason"] == "invalid_encoding" and "not UTF-8" in letter["error"]
    assert letter["source"] == {
        "topic": "predictions.requests",
        "partition": 3,
        "offset": 41,
        "timestamp": None,
    }
    assert letter["request"] is None and letter["raw"] is None
