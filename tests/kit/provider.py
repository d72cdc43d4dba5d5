"""A provider of the test's own on loopback, for answers the simulator cannot give: a 200
whose `usage` is absurd or missing, an error object with usage, `choices: []`, a 429 timed
by the test, a gzip bomb, an endless body. Real HTTP, real aiohttp."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

__all__ = ["answer", "provider_on", "serving"]

# One body per call: the n-th call (from 0) gets `answers(n)`.
Answers = Callable[[int], dict[str, Any]]


@asynccontextmanager
async def serving(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """`handle` answering POST {base}/chat/completions; yields the base URL (…/v1)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


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

    async with serving(chat) as base:
        yield base
