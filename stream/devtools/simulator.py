"""The provider simulator: an OpenAI-compatible server with latency and fault injection.

Tests, the demo and the benchmarks point SYNTHETIC_BASE_URL / TOGETHER_BASE_URL at it.
It answers for any model name, under `/v1/...` and `/openai/v1/...`:

    GET  /v1/models                 the models it has been asked for (plus a few defaults)
    POST /v1/chat/completions       a realistic chat completion (or an injected fault);
                                    server-sent events when the body asks `stream: true`
    GET  /sim/stats                 counters as JSON: requests per model, per outcome
    GET  /sim/calls                 every call's start and end (with `--trace`)
    POST /sim/reset                 zero the counters

Like the real APIs, every answer carries an `x-request-id` header and announces its rate
limits (`x-ratelimit-limit|remaining|reset-requests|tokens`, fixed windows of
`rate_window_s`); past `rate_limit` requests in a window it answers 429 until the reset.
The fault grammar (`--faults`, `--latency`) is `stream.devtools.faults`; the answers
themselves (usage with its detail objects, finish reasons, stream chunks) are
`stream.devtools.answers`.

Given a seed it is deterministic: the n-th request for a model draws the same fault, the
same latency and the same answer on every run, whatever the interleaving between models.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import random
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from stream.config import Settings, seconds_option
from stream.devtools.answers import (
    ANSWER_KINDS,
    Answer,
    answer_for,
    cacheable_prefix,
    sse_events,
)
from stream.devtools.failures import error_response, fault_response
from stream.devtools.faults import (
    FAULT_HELP,
    FaultPlan,
    Latency,
    known_kind,
    parse_faults,
    parse_latency,
)
from stream.devtools.simstats import RateWindow, SimStats, prompt_key
from stream.errors import ConfigError, UsageError, flag_value
from stream.observe.health import listen

__all__ = ["SimConfig", "Simulator", "register", "simulate_command"]

logger = logging.getLogger(__name__)

_MARKER = re.compile(r"\[\[sim:([^\]]+)\]\]")
_REPEAT = re.compile(r"^(.*?)x(\d+)$")
_DEFAULT_MODELS = (
    "hf:deepseek-ai/DeepSeek-R1-0528",
    "hf:moonshotai/Kimi-K2-Thinking",
    "deepseek-ai/DeepSeek-R1",
    "moonshotai/Kimi-K2-Instruct",
)


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0
    latency: Latency = field(default_factory=Latency)
    seed: int = 0
    faults: FaultPlan = field(default_factory=FaultPlan)
    # When set, requests must carry `Authorization: Bearer <api_key>` (else a 401 that
    # echoes the key presented, as some providers do).
    api_key: str | None = None
    # Requests (and tokens) allowed per window, announced in x-ratelimit-* headers and
    # enforced with 429s. The default is a big plan: announced, never reached in tests.
    rate_limit: int = 1_000_000
    token_limit: int = 1_000_000_000
    rate_window_s: float = 60.0
    trace: bool = False  # keep every call's start and end for GET /sim/calls


class Simulator:
    """`async with Simulator(config) as sim:` serves on `sim.url` (an `/v1` base URL)."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self._stats = SimStats(trace=self.config.trace)
        self._seen: Counter[str] = Counter()
        self._per_model: Counter[str] = Counter()
        self._models: dict[str, None] = dict.fromkeys(_DEFAULT_MODELS)
        self._prefixes: set[str] = set()  # conversations seen: their prefix is "cached"
        self._started = time.monotonic()
        self._window = self._new_window()
        self._ids = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot()

    def reset(self) -> None:
        self._stats.reset()
        self._seen.clear()

    def _new_window(self) -> RateWindow:
        config = self.config
        return RateWindow(
            length_s=config.rate_window_s,
            request_limit=config.rate_limit,
            token_limit=config.token_limit,
            started=self._started,
        )

    def __repr__(self) -> str:
        return f"Simulator({self.base}, requests={self._stats.requests})"

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        for prefix in ("/v1", "/openai/v1"):
            app.router.add_get(f"{prefix}/models", self._list_models)
            app.router.add_post(f"{prefix}/chat/completions", self._chat)
        app.router.add_get("/sim/stats", self._get_stats)
        app.router.add_get("/sim/calls", self._get_calls)
        app.router.add_post("/sim/reset", self._post_reset)
        # Cancel a hung handler when its client gives up, or hangs pile up forever.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        hint = "pick another with --port (0 picks a free one) or --host"
        try:
            await listen(
                self._runner,
                self.config.host,
                self.config.port,
                what="the simulator",
                hint=hint,
                backlog=4096,
            )
        except ConfigError:
            await self.stop()
            raise
        self.port = self._runner.addresses[0][1]
        self._started = time.monotonic()
        self._window = self._new_window()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _list_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "simulator"}
            for m in self._models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _get_calls(self, request: web.Request) -> web.Response:
        return web.json_response(self._stats.calls())

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            model, messages = body["model"], body["messages"]
            if not isinstance(model, str) or not isinstance(messages, list) or not messages:
                raise TypeError("model must be a string and messages a non-empty list")
        except (ValueError, KeyError, TypeError) as exc:
            return error_response(400, "invalid_request_error", f"bad request: {exc}")
        key = prompt_key(messages)
        if not self._authorized(request):
            self._stats.finish(self._stats.start(model, "401", key), key, answered=False)
            # Like some real providers, echo the key that was presented: the worst case for
            # a client that must keep keys out of its errors, logs and dead letters.
            presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return error_response(
                401, "invalid_api_key", f"Incorrect API key provided: {presented}"
            )
        kind, delay = self._decide(request, model, messages)
        reset = self._window.roll(time.monotonic())
        if self._window.requests >= self.config.rate_limit:
            kind = f"429/{reset:.3f}"
        self._window.requests += 1
        call = self._stats.start(model, (kind or "ok").partition("/")[0], key)
        answered = False
        try:
            if kind is not None and kind not in ANSWER_KINDS:
                response = await fault_response(request, kind)
            else:
                await asyncio.sleep(delay)
                response = await self._completion(request, body, kind)
                answered = kind is None  # a good answer: asking it again is paying twice
        finally:
            self._stats.finish(call, key, answered=answered)
        return response

    def _decide(
        self, request: web.Request, model: str, messages: list[Any]
    ) -> tuple[str | None, float]:
        """(fault kind or None, latency) for the n-th request to `model`: seeded, so the
        same on every run whatever the interleaving with other models."""
        self._models.setdefault(model)
        n = self._per_model[model]
        self._per_model[model] += 1
        rng = random.Random(f"{self.config.seed}:{model}:{n}")
        elapsed = time.monotonic() - self._started
        kind = self._forced(request, messages) or self.config.faults.pick(
            model, rng.random(), elapsed
        )
        delay = _header_float(request, "x-sim-latency")
        return kind, self.config.latency.sample(rng) if delay is None else delay

    def _authorized(self, request: web.Request) -> bool:
        expected = self.config.api_key
        return expected is None or request.headers.get("Authorization") == f"Bearer {expected}"

    def _forced(self, request: web.Request, messages: list[Any]) -> str | None:
        """A fault the request itself asks for (header or marker), honouring `xN`."""
        raw = request.headers.get("x-sim-fault") or _marker(messages)
        if not raw:
            return None
        match = _REPEAT.match(raw)
        kind, times = (match.group(1), int(match.group(2))) if match else (raw, 0)
        if not known_kind(kind):
            return None
        if times:
            key = hashlib.sha256(json.dumps([raw, messages], sort_keys=True).encode()).hexdigest()
            self._seen[key] += 1
            if self._seen[key] > times:
                return None
        return kind

    async def _completion(
        self, request: web.Request, body: dict[str, Any], kind: str | None
    ) -> web.StreamResponse:
        headers = self._headers()
        if kind == "malformed":
            return web.Response(
                body=b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "tru',
                content_type="application/json",
                headers=headers,
            )
        prefix, cached = cacheable_prefix(body["messages"])
        seen = prefix in self._prefixes and cached > 0
        self._prefixes.add(prefix)
        answer = answer_for(body, self.config.seed, kind, cached if seen else 0)
        self._window.tokens += int(answer.body["usage"]["total_tokens"])
        if body.get("stream") is True:
            return await self._stream(request, body, answer.body, headers)
        return web.json_response(answer.body, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        answer: dict[str, Any],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        response = web.StreamResponse(
            status=200,
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        for event in sse_events(Answer(answer), include_usage):
            await response.write(event)
        await response.write_eof()
        return response

    def _headers(self) -> dict[str, str]:
        """x-request-id and the rate limits, as the real APIs send them on every answer."""
        self._ids += 1
        digest = hashlib.sha256(f"{self.config.seed}:{self._ids}".encode()).hexdigest()[:20]
        reset = self._window.roll(time.monotonic())
        return {"x-request-id": f"req_{digest}", **self._window.headers(reset)}


def _marker(messages: list[Any]) -> str | None:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            found = _MARKER.search(str(message.get("content", "")))
            return found.group(1) if found else None
    return None


def _header_float(request: web.Request, name: str) -> float | None:
    try:
        return max(0.0, float(request.headers[name]))
    except (KeyError, ValueError):
        return None


def simulate_command(port: int, latency: object, *options: str) -> list[str]:
    """The command line that runs `stream simulate` in its own process (benchmarks and the
    chaos run keep it off the event loop they measure)."""
    simulate = ["-m", "stream", "simulate", "--port", str(port), "--latency", str(latency)]
    return [sys.executable, *simulate, *options]


def register(commands: Any) -> None:
    """Add `stream simulate` to the CLI."""
    parser = commands.add_parser(
        "simulate",
        help="run the OpenAI-compatible provider simulator",
        description="An OpenAI-compatible server for both providers' model names, with "
        "latency and fault injection. Point SYNTHETIC_BASE_URL / TOGETHER_BASE_URL at "
        "http://HOST:PORT/v1 (or /openai/v1). Counters at GET /sim/stats.",
        epilog=FAULT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=8100, help="listen port (default 8100)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    parser.add_argument(
        "--latency",
        default="0",
        help="SECONDS, or uniform:LOW:HIGH, exp:MEAN, normal:MEAN:SD (default 0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--faults", default="", help="fault rules, see below")
    parser.add_argument("--api-key", default=None, help="require this bearer key (else 401)")
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=1_000_000,
        help="requests per window before 429s, announced in x-ratelimit-* (default 1000000)",
    )
    parser.add_argument(
        "--rate-window",
        type=seconds_option,
        default=60.0,
        help="rate-limit window: seconds, or 1m (default 60)",
    )
    parser.add_argument(
        "--trace", action="store_true", help="keep every call's start and end (GET /sim/calls)"
    )
    parser.set_defaults(handler=_simulate)


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port: use 0 to 65535 (0 picks one)")
    if args.rate_limit < 1 or not 0 < args.rate_window < math.inf:
        raise UsageError(
            "--rate-limit must be at least 1 request and --rate-window a positive number of "
            "seconds (the defaults, 1000000 per 60 s, limit nothing)"
        )
    config = SimConfig(
        host=args.host,
        port=args.port,
        latency=flag_value(parse_latency, args.latency),
        seed=args.seed,
        faults=flag_value(parse_faults, args.faults),
        api_key=args.api_key,
        rate_limit=args.rate_limit,
        rate_window_s=args.rate_window,
        trace=args.trace,
    )
    asyncio.run(_serve(config))
    return 0


async def _serve(config: SimConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Simulator(config) as sim:
        print(f"simulator listening on {sim.url} (seed {config.seed})", flush=True)  # noqa: T201
        await stop.wait()
