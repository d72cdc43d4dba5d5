"""Prediction requests sent to the pipeline, and the terminal records they end as."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from stream.config import Settings
from stream.stages import Topics
from tests.kit import eventually
from tests.kit.kafka import Record, produce, read_all


def request(rid: str, model: str, text: str = "Say hello.", **extra: Any) -> bytes:
    return orjson.dumps(
        {
            "request_id": rid,
            "model": model,
            "messages": [{"role": "user", "content": text}],
            **extra,
        }
    )


async def terminal(
    settings: Settings, count: int
) -> dict[str, tuple[str, dict[str, Any], dict[str, bytes]]]:
    """request id → (topic, record, headers) of every terminal record, once `count` exist."""
    names = Topics.of(settings)
    found: dict[str, Any] = {}

    async def enough() -> bool:
        found.clear()
        for topic in (names.results, names.dead_letter):
            for record in await read_all(settings, topic):
                value = orjson.loads(record.value)
                rid = value["request_id"] or dict(record.headers)["request-id"].decode()
                assert rid not in found, f"two terminal records for {rid}"
                found[rid] = (topic, value, dict(record.headers))
        return len(found) >= count

    await eventually(enough, timeout_s=60)
    return found


async def send(
    settings: Settings,
    items: list[tuple[str, bytes]],
    headers: Callable[[str], list[tuple[str, bytes]]] | None = None,
) -> None:
    """Write (request id, value) items to the requests topic, keyed by their id, each
    with the headers `headers` gives it (by default its request-id)."""
    await produce(
        settings,
        Topics.of(settings).requests,
        [
            Record(
                value,
                rid.encode(),
                headers=headers(rid) if headers else [("request-id", rid.encode())],
            )
            for rid, value in items
        ],
    )
