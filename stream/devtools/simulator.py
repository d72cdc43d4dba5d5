"""The provider simulator: an OpenAI-compatible server with latency and fault injection.

Tests, the demo and the benchmarks point SYNTHETIC_BASE_URL / TOGETHER_BASE_URL at it.
It answers for any model name, under `/v1/...` and `/openai/v1/...`:

    GET  /v1/models                 the models it has been asked for (plus a few defaults)
    POST /v1/chat/completions       a realistic chat completion (or an injected fault)
    GET  /sim/stats                 counters as JSON: requests per model, per outcome
    POST /sim/reset                 zero the counters

The fault grammar (`--faults`, `--latency`) is `stream.devtools.faults`.

Given a seed it is deterministic: the n-th request for a model draws the same fault, the
same latency and the same answer on every run, whatever the interleaving between models.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import re
import signal
import socket
import struct
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from stream.config import Settings
from stream.devtools.faults import (
    FAULT_HELP,
    FaultPlan,
    Latency,
    known_kind,
    parse_faults,
    parse_latency,
)
from stream.errors import ConfigError
from stream.observe.health import listen

__all__ = ["SimConfig", "Simulator", "register", "simulate_command"]

logger = logging.getLogger(__name__)

_MARKER = re.compile(r"\[\[sim:([^\]]+)\]\]")
_REPEAT = re.compile(r"^(.*?)x(\d+)$")
_WORDS = (
    "stream partition offset model answer token latency broker replica leader commit "
    "record fallback provider window deadline retry circuit budget signal"
).split()
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


class _Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_model: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.by_model_outcome: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.in_flight = 0
        self.peak_in_flight = 0

    def start(self, model: str, outcome: str) -> None:
        # Counted when decided, not when done: a hang the client gave up on is still a hang,
        # and a test reading the stats right after its call sees every request it made.
        self.requests += 1
        self.by_model[model] += 1
        self.by_outcome[outcome] += 1
        self.by_model_outcome[model][outcome] += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def finish(self) -> None:
        self.in_flight -= 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_model": dict(self.by_model),
            "by_outcome": dict(self.by_outcome),
            "by_model_outcome": {m: dict(c) for m, c in self.by_model_outcome.items()},
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
        }


class Simulator:
    """`async with Simulator(config) as sim:` serves on `sim.url` (an `/v1` base URL)."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self._stats = _Stats()
        self._seen: Counter[str] = Counter()
        self._per_model: Counter[str] = Counter()
        self._models: dict[str, None] = dict.fromkeys(_DEFAULT_MODELS)
        self._started = time.monotonic()
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
            return _error(400, "invalid_request_error", f"bad request: {exc}")
        if not self._authorized(request):
            self._stats.start(model, "401")
            self._stats.finish()
            # Like some real providers, echo the key that was presented: the worst case for
            # a client that must keep keys out of its errors, logs and dead letters.
            presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return _error(401, "invalid_api_key", f"Incorrect API key provided: {presented}")
        kind, delay = self._decide(request, model, messages)
        self._stats.start(model, (kind or "ok").partition("/")[0])
        try:
            if kind is not None and kind not in ("malformed", "empty", "notjson", "huge"):
                return await _fault(request, kind)
            await asyncio.sleep(delay)
            return self._completion(body, model, messages, kind)
        finally:
            self._stats.finish()

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

    def _completion(
        self, body: dict[str, Any], model: str, messages: list[Any], kind: str | None
    ) -> web.Response:
        if kind == "malformed":
            return web.Response(
                body=b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "tru',
                content_type="application/json",
            )
        answer = _answer_text(self.config.seed, model, messages)
        if kind == "huge":
            answer = " ".join([answer] * (1536 * 1024 // (len(answer) + 1) + 1))
        form = body.get("response_format")
        wants_json = isinstance(form, dict) and form.get("type") in ("json_object", "json_schema")
        content = json.dumps({"answer": answer}) if wants_json and kind != "notjson" else answer
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "" if kind == "empty" else content,
        }
        _add_reasoning(model, message, answer)
        return web.json_response(_envelope(model, messages, message, answer))


def _envelope(
    model: str, messages: list[Any], message: dict[str, Any], answer: str
) -> dict[str, Any]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
    completion = len(answer.split())
    digest = hashlib.sha256(f"{model}:{answer}".encode()).hexdigest()[:24]
    return {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _add_reasoning(model: str, message: dict[str, Any], answer: str) -> None:
    """R1-style models think inside the content; Kimi-style thinking models in a field."""
    lowered = model.lower()
    thought = f"The user wants {len(answer.split())} words; think about {answer.split()[0]}."
    if "r1" in lowered:
        message["content"] = f"<think>\n{thought}\n</think>\n\n{message['content']}"
    elif "thinking" in lowered:
        message["reasoning_content"] = thought


def _answer_text(seed: int, model: str, messages: list[Any]) -> str:
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    prompt = str(last.get("content", ""))
    digest = hashlib.sha256(f"{seed}:{model}:{prompt}".encode()).digest()
    rng = random.Random(digest)
    words = [rng.choice(_WORDS) for _ in range(8 + digest[0] % 24)]
    return " ".join(words).capitalize() + "."


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


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": code, "code": code}}
    return web.json_response(body, status=status, headers=headers)


async def _fault(request: web.Request, kind: str) -> web.StreamResponse:
    name, _, arg = kind.partition("/")
    if name == "429":
        wait = float(arg) if arg else 1.0
        return _error(
            429,
            "rate_limit_exceeded",
            "rate limited by the simulator",
            **{"retry-after": f"{wait:g}", "retry-after-ms": f"{wait * 1000:.0f}"},
        )
    if name == "quota":
        return _error(429, "insufficient_quota", "you exceeded your current quota")
    if name == "hang":
        await asyncio.sleep(float(arg) if arg else 600.0)
        return _error(504, "timeout", "the simulator hung and then gave up")
    if name == "reset":
        return _reset(request)
    if name == "resetbody":
        return await _reset_mid_body(request)
    status = int(name)
    return _error(status, _ERROR_CODES.get(status, "server_error"), f"simulated HTTP {status}")


_ERROR_CODES = {400: "invalid_request_error", 401: "invalid_api_key", 404: "model_not_found"}


def _reset(request: web.Request) -> web.StreamResponse:
    """Close the connection with an RST (SO_LINGER 0), as a crashed upstream would."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise asyncio.CancelledError


async def _reset_mid_body(request: web.Request) -> web.StreamResponse:
    """A 200 whose body stops halfway, then an RST: the client has begun reading."""
    body = b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "half an answer, then'
    response = web.StreamResponse(
        status=200, headers={"Content-Type": "application/json", "Content-Length": "4096"}
    )
    await response.prepare(request)
    await response.write(body)
    await asyncio.sleep(0.01)  # let the headers and the first bytes reach the client
    return _reset(request)


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
    parser.set_defaults(handler=_simulate)


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port: use 0 to 65535 (0 picks one)")
    config = SimConfig(
        host=args.host,
        port=args.port,
        latency=parse_latency(args.latency),
        seed=args.seed,
        faults=parse_faults(args.faults),
        api_key=args.api_key,
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
