"""A provider on loopback that answers what the simulator cannot: a 200 whose `usage` is
absurd or missing, an error object with usage, `choices: []`. Real HTTP, real aiohttp."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

__all__ = ["answer", "provider_on"]

# One body per call: the n-th call (from 0) gets `answers(n)`.
Answers = Callable[[int], dict[str, Any]]


def answer(
    usage: dict[str, Any] | None, content: str = "hello", rid: str = "resp-1"
) -> dict[str, Any]:
    """A chat completion; without `usage` when it is None."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion",
        "model": "hf:test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


@asynccontextmanager
async def provider_on(answers: Answers, calls: list[int]) -> AsyncIterator[str]:
    """The base URL of a server answering each POST with `answers(n)`; `calls` gets n."""

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        n = len(calls)
        calls.append(n)
        return web.json_response(answers(n))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
