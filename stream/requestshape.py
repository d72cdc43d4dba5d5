"""The shape nearly every prediction request takes, recognised in a few look-ups.

Every request is validated against topics/request.schema.json by the schema compiled
(`fastjsonschema`, ~4 µs for a short request: a set built, every key looked for). Nearly
every request has the same plain shape: `plain_request` recognises it in ~1 µs, and says
True only for a body the schema passes (a property test holds it to that, with jsonschema
judging). False is no verdict: the compiled schema then decides, and says what is wrong.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

__all__ = ["PLAIN_SCHEMA", "fingerprint_of", "plain_request", "schema_fingerprint"]

# The fingerprint of the request schema `plain_request` was written for: topics/
# request.schema.json. A schema that differs in anything, a description too (a
# STREAM_TOPICS_DIR of an operator's, a later version), gets only its compiled check.
PLAIN_SCHEMA = "5b25904f12ffd4a72f69cc07425c3652b40b123c08668fed069e8ef3149384d6"
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_EFFORTS = frozenset({"low", "medium", "high"})
_NUMBERS = (int, float)  # as orjson reads them: a bool is neither
_TEXT_OR_LIST = (str, list)


def schema_fingerprint(path: Path) -> str:
    """A schema file's content as parsed (not its spacing or key order), as a SHA-256."""
    return fingerprint_of(orjson.loads(path.read_bytes()))


def fingerprint_of(schema: Any) -> str:
    """`schema_fingerprint` of a schema already parsed."""
    return hashlib.sha256(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).hexdigest()


def plain_request(body: Any) -> bool:
    """True only when `body` surely passes request.schema.json: the shape of nearly every
    request, checked in a few look-ups (~1 µs, the compiled schema ~4). False is no
    verdict: anything else (a deadline, `response_format`, a bool where a number goes,
    an edge) goes on to the compiled schema, which says what is wrong."""
    if type(body) is not dict:
        return False
    get = body.get
    request_id, model, messages = get("request_id"), get("model"), get("messages")
    if (
        type(request_id) is not str
        or not 0 < len(request_id) <= 128
        or type(model) is not str
        or not 0 < len(model) <= 200
        or type(messages) is not list
        or not messages
        or get("deadline") is not None
        or type(get("metadata", {})) not in (dict, type(None))
    ):
        return False
    for message in messages:
        if type(message) is not dict:
            return False
        role, content = message.get("role"), message.get("content")
        if type(role) is not str or role not in _ROLES:
            return False
        if content is not None and type(content) not in _TEXT_OR_LIST:
            return False
        if "name" in message and type(message["name"]) is not str:
            return False
    if "params" in body:
        params = body["params"]
        return type(params) is dict and all(_plain_param(k, v) for k, v in params.items())
    return True


def _plain_param(name: str, value: Any) -> bool:
    if name == "temperature":
        return type(value) in _NUMBERS and 0 <= value <= 2
    if name == "top_p":
        return type(value) in _NUMBERS and 0 <= value <= 1
    if name == "max_tokens":
        return type(value) is int and value >= 1
    if name == "seed":
        return type(value) is int
    if name == "stop":
        return type(value) in _TEXT_OR_LIST
    if name == "reasoning_effort":
        return type(value) is str and value in _EFFORTS
    return name != "response_format"  # any other is passed through as it is
