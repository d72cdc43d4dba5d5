"""A finished chat completion, and how one is read out of a provider's 200 response.

A 200 is not always a success: an empty answer, or prose where JSON was asked for, is a
failure the retry loop may try again (`BadOutput`); an answer the provider filtered
(`finish_reason: content_filter`) is one it may not (the same prompt is filtered again).
How the answer ended is kept as the provider said it: `finish_reason`, tool calls (their
content may be null: that is an answer, not an empty one), an answer cut at `max_tokens`
(`length`: a result, flagged, even when the cut left no text), the full `usage` with its
detail objects, and the provider's id for the response (to quote to its support).

Reasoning arrives three ways across providers and models — `<think>…</think>` inside the
content (DeepSeek R1), or a `reasoning_content` / `reasoning` field — and all three end up
in `Completion.reasoning`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "BadOutput",
    "Completion",
    "Parsed",
    "Usage",
    "parse_completion",
    "split_reasoning",
    "wants_json",
]

# Token counts as the provider gave them: top-level integers, and one level of detail
# objects (`completion_tokens_details.reasoning_tokens`, `prompt_tokens_details.cached_tokens`).
Usage = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Completion:
    # None when the answer has no text: tool calls only, or cut at max_tokens before any.
    content: str | None
    reasoning: str | None
    usage: Usage | None
    provider: str
    # The model string the provider says served the call (the requested one if it is silent).
    provider_model: str
    attempts: int
    latency_ms: float
    finish_reason: str | None = None
    tool_calls: list[Any] | None = None
    provider_request_id: str | None = None
    # What this call cost at the catalog's prices, failed paid attempts included (None: the
    # model has no price, or an answer came without usage: `stream.providers.charges`).
    cost_usd: float | None = None

    @property
    def truncated(self) -> bool:
        """Cut at max_tokens (or the context length): kept as a result, flagged."""
        return self.finish_reason == "length"


@dataclass(frozen=True, kw_only=True)
class Parsed:
    """What one 200 response held, before attempts and latency are known."""

    content: str | None
    reasoning: str | None
    usage: Usage | None
    served_model: str | None
    finish_reason: str | None = None
    tool_calls: list[Any] | None = None
    response_id: str | None = None


class BadOutput(Exception):
    """A 200 whose body is not a usable answer; `error_type` says how. All are retryable but
    a filtered answer (`content_filter`): the same prompt would be filtered again, and paid.
    All are the provider's fault (the breaker hears them) but prose where JSON was asked for
    (the prompt may be ours) and a filtered answer (the prompt's doing).
    `usage` is what the provider billed for it, and `finish_reason` how it said the answer
    ended, when the body said."""

    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        retryable: bool = True,
        provider_fault: bool = True,
        usage: Usage | None = None,
        finish_reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.retryable = retryable
        self.provider_fault = provider_fault
        self.usage = usage
        self.finish_reason = finish_reason


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def split_reasoning(content: str) -> tuple[str, str | None]:
    """Move `<think>` blocks out of the content: (answer, reasoning or None).

    R1 sometimes omits the opening tag; a lone `</think>` still ends the reasoning.
    """
    if "</think>" not in content:  # most answers: no reasoning inline, no regex passes
        return content.strip(), None
    blocks = [b.strip() for b in _THINK.findall(content)]
    answer = _THINK.sub("", content)
    if "</think>" in answer:
        before, _, answer = answer.rpartition("</think>")
        blocks.insert(0, before.replace("<think>", "").strip())
    reasoning = "\n\n".join(b for b in blocks if b)
    return answer.strip(), reasoning or None


def wants_json(params: dict[str, Any] | None) -> bool:
    form = (params or {}).get("response_format")
    return isinstance(form, dict) and form.get("type") in ("json_object", "json_schema")


def parse_completion(body: bytes, *, json_output: bool) -> Parsed:
    """Read a chat completion body; raises `BadOutput` when it is not a usable answer."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        message = f"malformed response body: {exc}"
        raise BadOutput("malformed_response", message, usage=_salvaged_usage(body)) from exc
    try:
        choice = data["choices"][0]
        message = choice["message"]
        raw_content = message.get("content") or ""
        if not isinstance(raw_content, str):
            raise TypeError("content is not a string")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        # JSON without an answer (`choices: []`, an error object) may still say what it
        # billed: that usage is paid for, and counted.
        usage = _usage(data.get("usage")) if isinstance(data, dict) else None
        raise BadOutput(
            "malformed_response", f"malformed response body: {exc}", usage=usage
        ) from exc
    usage = _usage(data.get("usage"))
    finish = _text(choice.get("finish_reason"), 64)
    tool_calls = _tool_calls(message.get("tool_calls"))
    content, think = split_reasoning(raw_content)
    reasoning = _join(_field_reasoning(message), think)
    _check(content, finish, tool_calls, json_output, usage)
    return Parsed(
        content=content or None,
        reasoning=reasoning,
        usage=usage,
        served_model=_text(data.get("model"), 200),
        finish_reason=finish,
        tool_calls=tool_calls,
        response_id=_text(data.get("id"), 200),
    )


def _salvaged_usage(body: bytes) -> Usage | None:
    """The usage of a body that is JSON but for bytes that are not UTF-8 (read as U+FFFD):
    the answer is spoilt, but it was billed all the same."""
    try:
        data = orjson.loads(body.decode("utf-8", "replace"))
    except orjson.JSONDecodeError:
        return None
    return _usage(data.get("usage")) if isinstance(data, dict) else None


def _check(
    content: str,
    finish: str | None,
    tool_calls: list[Any] | None,
    json_output: bool,
    usage: Usage | None,
) -> None:
    """Raise `BadOutput` unless the answer is one to keep."""
    if finish == "content_filter":
        raise BadOutput(
            "content_filter",
            "the provider filtered the answer (finish_reason content_filter)",
            retryable=False,
            provider_fault=False,
            usage=usage,
            finish_reason=finish,
        )
    if not content and tool_calls is None and finish != "length":
        raise BadOutput(
            "empty_content",
            "the provider returned an empty answer",
            usage=usage,
            finish_reason=finish,
        )
    if content and json_output and finish != "length" and not _is_json(content):
        raise BadOutput(
            "invalid_json_output",
            "JSON output was asked for; the answer is not JSON",
            provider_fault=False,
            usage=usage,
            finish_reason=finish,
        )


def _text(value: object, limit: int) -> str | None:
    """A non-empty string the provider sent, cut to `limit` (it is copied into records)."""
    return value[:limit] if isinstance(value, str) and value else None


def _tool_calls(raw: object) -> list[Any] | None:
    """The tool calls as the provider gave them (a list of objects), or None."""
    if not isinstance(raw, list) or not raw:
        return None
    return [call for call in raw if isinstance(call, dict)] or None


def _field_reasoning(message: dict[str, Any]) -> str | None:
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _join(first: str | None, second: str | None) -> str | None:
    parts = [p for p in (first, second) if p]
    return "\n\n".join(parts) if parts else None


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _usage(raw: object) -> Usage | None:
    """Counts only: integers at the top level, and detail objects of integers (one level).
    Anything else (strings, deeper nesting, booleans) is not a count and is dropped; but a
    token total that is no count (negative, a fraction, past 64 bits, a string) makes the
    whole usage unbelievable: None, charged as an answer without usage (what was held),
    not as the rest of it (a prompt of -500,000 tokens was charged for the completion)."""
    if not isinstance(raw, dict):
        return None
    usage: Usage = {}
    for key, value in raw.items():
        if value is None or _is_count(value):
            usage[str(key)] = value
        elif key in _TOTALS:
            return None
        elif isinstance(value, dict):
            usage[str(key)] = {str(k): v for k, v in value.items() if v is None or _is_count(v)}
    return usage


_TOTALS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
