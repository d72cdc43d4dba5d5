"""A finished chat completion, and how one is read out of a provider's 200 response.

A 200 is not always a success: an empty answer, or prose where JSON was asked for, is a
failure the retry loop may try again (`BadOutput`). Reasoning arrives three ways across
providers and models — `<think>…</think>` inside the content (DeepSeek R1), or a
`reasoning_content` / `reasoning` field — and all three end up in `Completion.reasoning`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["BadOutput", "Completion", "Parsed", "parse_completion", "split_reasoning", "wants_json"]


@dataclass(frozen=True, kw_only=True)
class Completion:
    content: str
    reasoning: str | None
    usage: dict[str, int | None] | None
    provider: str
    # The model string the provider says served the call (the requested one if it is silent).
    provider_model: str
    attempts: int
    latency_ms: float


@dataclass(frozen=True, kw_only=True)
class Parsed:
    """What one 200 response held, before attempts and latency are known."""

    content: str
    reasoning: str | None
    usage: dict[str, int | None] | None
    served_model: str | None


class BadOutput(Exception):
    """A 200 whose body is not a usable answer; `error_type` says how (all retryable)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def split_reasoning(content: str) -> tuple[str, str | None]:
    """Move `<think>` blocks out of the content: (answer, reasoning or None).

    R1 sometimes omits the opening tag; a lone `</think>` still ends the reasoning.
    """
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
        message = data["choices"][0]["message"]
        raw_content = message.get("content") or ""
        if not isinstance(raw_content, str):
            raise TypeError("content is not a string")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BadOutput("malformed_response", f"malformed response body: {exc}") from exc
    content, think = split_reasoning(raw_content)
    reasoning = _join(_field_reasoning(message), think)
    if not content:
        raise BadOutput("empty_content", "the provider returned an empty answer")
    if json_output and not _is_json(content):
        raise BadOutput("invalid_json_output", "JSON output was asked for; the answer is not JSON")
    served = data.get("model")
    return Parsed(
        content=content,
        reasoning=reasoning,
        usage=_usage(data.get("usage")),
        served_model=served if isinstance(served, str) and served else None,
    )


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


def _usage(raw: object) -> dict[str, int | None] | None:
    if not isinstance(raw, dict):
        return None
    # Keep the counts only; providers add nested detail objects we do not carry.
    return {
        str(k): v if isinstance(v, int) and not isinstance(v, bool) else None
        for k, v in raw.items()
        if v is None or (isinstance(v, int) and not isinstance(v, bool))
    }
