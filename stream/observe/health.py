"""The worker's HTTP face: `/metrics`, `/healthz` and `/readyz`, on aiohttp's web server.

`/healthz` answers 200 while the process runs (its event loop can answer at all).
`/readyz` answers 200 only when every readiness check passes — the engines have their
partitions assigned and the lag monitor's last round reached Kafka — and 503 with the
failing checks listed before that. No check and no scrape does Kafka I/O: they read flags
and caches that background tasks keep up to date.

A worker wires it up like this (all tasks owned by one task group):

    metrics, health = Metrics(), Health()
    monitor = LagMonitor(settings.kafka, [settings.group("predictions-primary")])
    metrics.watch_engine(engine); metrics.watch_lag(monitor)
    health.require_engine(engine); health.require_kafka(monitor)
    async with anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        port = await tg.start(serve, metrics, health, settings.metrics_host,
                              settings.metrics_port)
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Protocol

import anyio
from aiohttp import web
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST

from stream.errors import ConfigError
from stream.observe.lag import LagMonitor
from stream.observe.metrics import Metrics

__all__ = ["Health", "ReadyEngine", "application", "listen", "serve"]

log = logging.getLogger(__name__)


class _Flag(Protocol):
    def is_set(self) -> bool: ...


class ReadyEngine(Protocol):
    """An engine whose `ready` event is set once its partitions are assigned, and which
    says when it is stuck."""

    @property
    def name(self) -> str: ...
    @property
    def ready(self) -> _Flag: ...
    def problem(self) -> str | None: ...


class Health:
    """Named readiness checks; each returns None when fine, else why not."""

    def __init__(self) -> None:
        self._checks: list[tuple[str, Callable[[], str | None]]] = []

    def add(self, name: str, check: Callable[[], str | None]) -> None:
        self._checks.append((name, check))

    def require_engine(self, engine: ReadyEngine) -> None:
        def check() -> str | None:
            return engine.problem() if engine.ready.is_set() else "partitions not assigned yet"

        self.add(f"engine {engine.name}", check)

    def require_kafka(self, monitor: LagMonitor) -> None:
        def check() -> str | None:
            if monitor.last_error is not None:
                return monitor.last_error
            return None if monitor.healthy else "Kafka not reached yet"

        self.add("kafka", check)

    def failing(self) -> list[str]:
        """What keeps the worker from being ready; a worker with no checks is not ready."""
        if not self._checks:
            return ["nothing to be ready for: no readiness check registered"]
        return [f"{name}: {why}" for name, check in self._checks if (why := check()) is not None]


def application(metrics: Metrics, health: Health) -> web.Application:
    """/metrics, /healthz and /readyz, to serve (or to mount in another aiohttp app)."""

    async def scrape(request: web.Request) -> web.Response:
        body = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        failing = health.failing()
        if failing:
            return web.Response(status=503, text="not ready\n" + "".join(f"{f}\n" for f in failing))
        return web.Response(text="ready\n")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(
    metrics: Metrics,
    health: Health,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started` gets the bound port (port 0 picks one)."""
    runner = web.AppRunner(application(metrics, health), access_log=None)
    await runner.setup()
    try:
        # Two workers on one host with the default port is the usual way to get here.
        hint = (
            "set STREAM_METRICS_PORT to a free port (each worker process on a host needs "
            "its own; 0 picks one) and STREAM_METRICS_HOST to an address of this machine"
        )
        await listen(runner, host, port, what="/metrics", hint=hint)
        bound = int(runner.addresses[0][1])
        log.info("serving /metrics, /healthz, /readyz on %s:%d", host, bound)
        task_status.started(bound)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):  # release the port even when cancelled
            await runner.cleanup()


async def listen(
    runner: web.AppRunner, host: str, port: int, *, what: str, hint: str, backlog: int = 128
) -> None:
    """Bind `runner` on host:port, or one `ConfigError` that says what to change."""
    try:
        await web.TCPSite(runner, host, port, backlog=backlog).start()
    except OSError as exc:
        if isinstance(exc, socket.gaierror):
            why = f"{host!r} is not an address of this machine"
        elif exc.errno == errno.EADDRINUSE:
            why = f"port {port} is in use"
        else:
            why = exc.strerror or str(exc)
        raise ConfigError(f"cannot serve {what} on {host}:{port}: {why}; {hint}") from exc
