"""A provider of the test's own on loopback, for answers the simulator cannot give: a 200
whose `usage` is absurd or missing, an error object with usage, `choices: []`, a 429 timed
by the test, a gzip bomb, an endless body. Real HTTP, real aiohttp; `client_of` gives a
`ProviderClient` of it, and the messages that reached it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from stream.catalog import Model
from stream.config import ProviderSettings, Secret
from stream.prices import Price
from stream.providers import Backoff, ProviderClient

__all__ = ["answer", "ask", "client_of", "priced", "provider_on", "serving"]

FAST = Backoff(base_s=0.001, cap_s=0.01)


def priced(model_id: str) -> Model:
    """A Synthetic model (`hf:<id>`) at one micro-dollar per token, in and out."""
    return Model(
        id=model_id,
        provider="synthetic",
        api_model=f"hf:{model_id}",
        timeout_s=60,
        price=Price(input=1.0, output=1.0),
    )


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


@asynccontextmanager
async def client_of(
    handle: Callable[[str], Awaitable[web.StreamResponse]], **settings: Any
) -> AsyncIterator[tuple[ProviderClient, list[str]]]:
    """A client (Synthetic's settings, `settings` over them, quick back-offs) of a server
    answering each call with `handle(its last message's content)`; and the contents of
    the calls that reached the server, in order."""
    calls: list[str] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        text = orjson.loads(await request.read())["messages"][-1]["content"]
        calls.append(text)
        return await handle(text)

    async with serving(chat) as url:
        config = ProviderSettings(
            name="synthetic", base_url=url, api_key=Secret("sk-edge-test-key"), **settings
        )
        async with ProviderClient(config, backoff=FAST) as client:
            yield client, calls


def ask(text: str) -> list[dict[str, Any]]:
    """One user message."""
    return [{"role": "user", "content": text}]
