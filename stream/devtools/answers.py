"""What the simulator answers with: chat completion bodies shaped like the real APIs'.

OpenAI's chat completion (Synthetic and Together follow it): an `id`, `created`, `model`,
one choice with a `message` and a `finish_reason`, and `usage` with its detail objects
(`prompt_tokens_details.cached_tokens`, `completion_tokens_details.reasoning_tokens`).
Tokens are counted as words, deterministically, so tests can predict every figure:

    prompt_tokens      words in every message's content
    cached_tokens      all but the last message's words, once the same conversation
                       prefix was seen before (prompt caching)
    completion_tokens  words of the answer, plus words of the reasoning (thinking models)

How an answer ends, as the real APIs say it: `stop`; `length` (cut at `max_tokens`, or
the `length` fault: cut in half); `tool_calls` (content null, a tool call); and
`content_filter` (content null). With `stream: true` the same answer goes out as
server-sent events, `chat.completion.chunk` objects and `data: [DONE]`, with a final
usage chunk when `stream_options.include_usage` is asked for (OpenAI's shape).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["ANSWER_KINDS", "Answer", "answer_for", "sse_events"]

# Fault kinds that are 200 answers (the rest are errors or broken connections).
ANSWER_KINDS = frozenset(
    {"malformed", "empty", "notjson", "huge", "length", "tool_calls", "content_filter"}
)

_WORDS = (
    "stream partition offset model answer token latency broker replica leader commit "
    "record fallback provider window deadline retry circuit budget signal"
).split()


@dataclass(frozen=True)
class Answer:
    """One completion: the body as JSON, and the pieces the stream form re-sends."""

    body: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.body["id"])


def answer_for(request: dict[str, Any], seed: int, kind: str | None, cached_tokens: int) -> Answer:
    """The completion for `request` (already checked: model is a string, messages a list)."""
    model, messages = request["model"], request["messages"]
    text = _answer_text(seed, model, messages)
    if kind == "huge":
        text = " ".join([text] * (1536 * 1024 // (len(text) + 1) + 1))
    form = request.get("response_format")
    wants_json = isinstance(form, dict) and form.get("type") in ("json_object", "json_schema")
    content: str | None = json.dumps({"answer": text}) if wants_json and kind != "notjson" else text
    thought = _thought(model, text)
    finish = "stop"
    words = (content or "").split()
    limit = _max_tokens(request)
    if kind == "length" or (limit is not None and len(words) > limit):
        keep = len(words) // 2 if limit is None else limit
        content, finish = " ".join(words[:keep]) or None, "length"
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if kind == "empty":
        message["content"] = ""
    elif kind == "tool_calls":
        message["content"], finish = None, "tool_calls"
        message["tool_calls"] = [_tool_call(text)]
    elif kind == "content_filter":
        message["content"], finish = None, "content_filter"
    _add_reasoning(model, message, thought)
    completion = len((message.get("content") or "").split()) + len(thought.split())
    if message.get("tool_calls"):
        completion += len(json.dumps(message["tool_calls"]).split())
    prompt = _prompt_tokens(messages)
    digest = hashlib.sha256(f"{seed}:{model}:{json.dumps(messages)}:{kind}".encode()).hexdigest()
    return Answer(
        {
            "id": f"chatcmpl-{digest[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": min(cached_tokens, prompt)},
                "completion_tokens_details": {"reasoning_tokens": len(thought.split())},
            },
        }
    )


def cacheable_prefix(messages: list[Any]) -> tuple[str, int]:
    """(key, tokens) of the conversation before its last message: what a provider's prompt
    cache would have seen before when the same conversation goes on."""
    head = messages[:-1]
    key = hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()
    return key, _prompt_tokens(head)


def sse_events(answer: Answer, include_usage: bool) -> Iterator[bytes]:
    """The answer as server-sent events: role, content in pieces, finish, [usage], DONE."""
    body = answer.body
    choice = body["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
        data = {
            "id": body["id"],
            "object": "chat.completion.chunk",
            "created": body["created"],
            "model": body["model"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    for key in ("reasoning_content",):
        if message.get(key):
            yield chunk({key: message[key]}, None)
    for piece in _pieces(message.get("content") or ""):
        yield chunk({"content": piece}, None)
    if message.get("tool_calls"):
        calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        yield chunk({"tool_calls": calls}, None)
    yield chunk({}, choice["finish_reason"])
    if include_usage:
        data = {
            "id": body["id"],
            "object": "chat.completion.chunk",
            "created": body["created"],
            "model": body["model"],
            "choices": [],
            "usage": body["usage"],
        }
        yield b"data: " + json.dumps(data).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def _pieces(text: str, size: int = 4) -> Iterator[str]:
    words = text.split(" ")
    for start in range(0, len(words), size):
        piece = " ".join(words[start : start + size])
        yield piece if start == 0 else " " + piece


def _max_tokens(request: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = request.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _prompt_tokens(messages: list[Any]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))


def _tool_call(text: str) -> dict[str, Any]:
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    arguments = json.dumps({"topic": text.split()[0].lower()})
    return {
        "id": f"call_{digest}",
        "type": "function",
        "function": {"name": "lookup", "arguments": arguments},
    }


def _thought(model: str, answer: str) -> str:
    lowered = model.lower()
    if "r1" in lowered or "thinking" in lowered:
        return f"The user wants {len(answer.split())} words; think about {answer.split()[0]}."
    return ""


def _add_reasoning(model: str, message: dict[str, Any], thought: str) -> None:
    """R1-style models think inside the content; Kimi-style thinking models in a field."""
    if not thought:
        return
    if "r1" in model.lower():
        message["content"] = f"<think>\n{thought}\n</think>\n\n{message['content'] or ''}"
    else:
        message["reasoning_content"] = thought


def _answer_text(seed: int, model: str, messages: list[Any]) -> str:
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    prompt = str(last.get("content", ""))
    digest = hashlib.sha256(f"{seed}:{model}:{prompt}".encode()).digest()
    rng = random.Random(digest)
    words = [rng.choice(_WORDS) for _ in range(8 + digest[0] % 24)]
    return " ".join(words).capitalize() + "."
