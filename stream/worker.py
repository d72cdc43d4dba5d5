"""`stream run primary|fallback|all`: a worker process, its engines, clients and signals.

One process can run either stage or both (`all`, for small deployments). Scaling out is
more processes with the same command: Kafka's consumer groups share the partitions.
SIGTERM/SIGINT stop fetching and let running calls finish (`drain_grace_s`: at most the
catalog's longest model timeout, or `STREAM_SHUTDOWN_GRACE_S`); calls still waiting to go
out give their records back unpaid, for the next owner. Then commit and exit; a
second signal exits at once (what is not committed runs again later). An orchestrator must
allow `stop_grace_s` before it sends SIGKILL.

With `STREAM_INSTANCE_ID` (or `--instance-id`) each engine is a static member of its group
(`<id>-primary`, `<id>-fallback`): a restart with the same id gets its partitions back
without a rebalance, and a second process started with the same id makes the first exit.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import anyio
import anyio.abc

from stream import logs, topics
from stream.catalog import Catalog, load_catalog, unpriced
from stream.config import Settings, check_instance_id
from stream.engine.engine import Engine
from stream.engine.signals import run_until_signal
from stream.errors import ConfigError, KafkaError, StreamError, UsageError, flag_value
from stream.kafka import admin_client
from stream.observe.health import Health, serve
from stream.observe.lag import LagMonitor
from stream.observe.lagreader import PIPELINE_GROUPS
from stream.observe.metrics import Metrics
from stream.providers import ProviderClient
from stream.spend import Budget, SpendLanes
from stream.spendstate import SpendKeeper
from stream.stages import FallbackStage, PrimaryStage, Topics

__all__ = ["Worker", "drain_grace_s", "register", "stop_grace_s", "tune_gc"]

log = logging.getLogger(__name__)
# How long a worker starting up waits for a cluster to show it topics just created (a
# broker learns of new topics from the controllers, in milliseconds when it is well):
# long while it shows some (it is still learning of them, one after another), short
# while it shows none, which is most often topics never created (the operator hears so
# in 3 s, not 10; a worker started with a broker behind by more exits and is restarted).
_TOPICS_SETTLE_S = 10.0
_NO_TOPICS_SETTLE_S = 3.0

STAGES = ("primary", "fallback")
PRIMARY_GROUP = "predictions-primary"
FALLBACK_GROUP = "predictions-fallback"
GROUPS = {"primary": PRIMARY_GROUP, "fallback": FALLBACK_GROUP}
# After the drain an engine commits (at most 10 s), then releases its partitions, stops its
# producers and leaves the group (at most 10 s each): see stream.engine. A stop grace
# period must cover the drain and this.
COMMIT_AND_CLOSE_S = 40.0


def drain_grace_s(settings: Settings, catalog: Catalog) -> float:
    """How long SIGTERM lets running calls finish: `STREAM_SHUTDOWN_GRACE_S` when set (a
    cap), else the catalog's longest model timeout, which no call outlives (its retries
    included), so nothing answered is abandoned and paid for again by the next owner."""
    explicit = settings.engine.shutdown_grace_s
    if explicit is not None:
        return explicit
    return max((model.timeout_s for model in catalog.models.values()), default=0.0)


def stop_grace_s(settings: Settings, catalog: Catalog) -> float:
    """The least stop grace period an orchestrator must give a worker before SIGKILL
    (docker compose's `stop_grace_period`, Kubernetes' `terminationGracePeriodSeconds`)."""
    return drain_grace_s(settings, catalog) + COMMIT_AND_CLOSE_S


class Worker:
    """The engines of one process, sharing provider clients (and connection pools), with
    `/metrics`, `/healthz`, `/readyz` and a background lag monitor beside them."""

    def __init__(
        self,
        settings: Settings,
        stages: Sequence[str],
        *,
        catalog: Catalog | None = None,
        lag_interval_s: float = 15.0,
        own_process: bool = False,
    ) -> None:
        self._own_process = own_process  # the process is this worker's: tune its GC
        self.stages = tuple(stages)
        self.catalog = catalog or load_catalog(settings)
        self.drain_grace_s = drain_grace_s(settings, self.catalog)
        # Resolved once: every engine drains as long as the catalog's calls may take.
        engine = replace(settings.engine, shutdown_grace_s=self.drain_grace_s)
        self.settings = replace(settings, engine=engine)
        self.metrics = Metrics()
        self.health = Health()
        self.engines: list[Engine] = []
        self.clients: dict[str, ProviderClient] = {}
        self._stopping = False
        self._checking: anyio.CancelScope | None = None  # start-up's topic check: stop cancels
        self.started = anyio.Event()  # set once `engines` is filled and `port` bound
        self.port: int | None = None
        self._record_limits: dict[str, int] = {}  # topic → max.message.bytes on the cluster
        groups = {  # each group → its topics: their partitions show before a first commit
            settings.group(name): tuple(map(settings.topic, PIPELINE_GROUPS[name]))
            for name in (GROUPS[stage] for stage in self.stages)
        }
        self.monitor = LagMonitor(settings.kafka, groups, interval_s=lag_interval_s)
        self.spend = spend_lanes(settings, self.catalog)

    def __repr__(self) -> str:
        return f"Worker(stages={self.stages}, port={self.port}, engines={self.engines!r})"

    async def run(self) -> None:
        """Run until `stop()` (or cancellation); drain and commit on the way out."""
        with anyio.CancelScope() as self._checking:  # a stop now ends start-up at once
            if self._stopping:
                self._checking.cancel()
            self._record_limits = await check_topics(self.settings)
        self._checking = None
        if self._stopping:
            log.info("stopped during start-up: nothing ran")
            return
        async with AsyncExitStack() as stack:
            keeper = self._spend_keeper()
            if keeper is not None:
                keeper.open()  # before any call: what an earlier run spent counts
                stack.callback(keeper.close)
            self.clients = clients = {
                name: await stack.enter_async_context(
                    ProviderClient(getattr(self.settings, name), observer=self.metrics)
                )
                for name in ("synthetic", "together")
            }
            self.engines = [self._engine(stage, clients) for stage in self.stages]
            if self._stopping:
                self.stop()
            async with anyio.create_task_group() as group:
                if keeper is not None:
                    group.start_soon(keeper.run)
                await self._observe(group)
                async with anyio.create_task_group() as engines:
                    for engine in self.engines:
                        engines.start_soon(engine.run)
                group.cancel_scope.cancel()  # engines done: stop the monitor and the server

    def _spend_keeper(self) -> SpendKeeper | None:
        """Keeps the spend window on disk while a limit is set (`stream.spendstate`)."""
        if self.spend is None:
            return None
        settings = self.settings
        name = f"{settings.topic_prefix}{settings.engine.instance_id or 'worker'}"
        return SpendKeeper(settings.spend.state_dir, name, self.spend.budgets())

    def _warn_missing_keys(self) -> None:
        """A key left empty (an empty mounted secret) makes a worker that looks healthy and
        answers nothing on that provider: say so at start, where an operator looks first."""
        if "primary" in self.stages and not self.settings.synthetic.api_key:
            log.warning(
                "SYNTHETIC_API_KEY is not set (or its _FILE is empty): every request will be "
                "sent to Synthetic without a key and fail over; set it (behind a proxy that "
                "adds its own key, any value stops this warning)"
            )
        if "fallback" in self.stages and not self.settings.together.api_key:
            log.warning(
                "TOGETHER_API_KEY is not set (or its _FILE is empty): requests that fail on "
                "Synthetic become fallback_unconfigured dead letters"
            )

    async def _observe(self, group: anyio.abc.TaskGroup) -> None:
        """Start the lag monitor and the HTTP server; readiness follows the engines."""
        monitor = self.monitor
        self.metrics.watch_lag(monitor, owned=self._owned)
        if self.spend is not None:
            self.metrics.watch_budgets(self.spend.budgets())
        self.health.require_kafka(monitor)
        for engine in self.engines:
            self.metrics.watch_engine(engine)
            self.health.require_engine(engine)
        # The port first: a port in use fails start-up before the lag monitor starts its
        # Kafka clients (none left to close, no "Unclosed consumer" noise).
        self.port = await group.start(
            serve, self.metrics, self.health, self.settings.metrics_host, self.settings.metrics_port
        )
        await group.start(monitor.run)
        log.info("serving /metrics, /healthz and /readyz on port %s", self.port)
        self._warn_missing_keys()  # once start-up's own errors (one line each) are past
        log.info(
            "on SIGTERM, running calls get %.0f s to finish: allow a stop grace period of at "
            "least %.0f s (docker compose stop_grace_period, terminationGracePeriodSeconds)",
            self.drain_grace_s,
            self.drain_grace_s + COMMIT_AND_CLOSE_S,
        )
        if self._own_process:
            tune_gc()  # now: what start-up built (catalog, schemas, pools) is frozen too
        self.started.set()

    def _owned(self) -> set[tuple[str, str, int]]:
        """(group, topic, partition) of every partition the engines hold: the lag metrics
        of a group are exported by the member that holds its lowest partition."""
        return {
            (engine.group_id, tp.topic, tp.partition)
            for engine in self.engines
            for tp in engine.partitions()
        }

    def stop(self) -> None:
        self._stopping = True  # a signal during start-up stops the engines once made
        if self._checking is not None:
            self._checking.cancel()
        for engine in self.engines:
            engine.stop()
        # Calls still waiting to go out (the spend limit, a slot, a back-off) give their
        # records back unpaid: the drain waits only for calls that are out.
        for client in self.clients.values():
            client.withdraw_waiting()

    def _engine(self, stage: str, clients: dict[str, ProviderClient]) -> Engine:
        topics = Topics.of(self.settings)
        group = self.settings.group(GROUPS[stage])
        stage_: PrimaryStage | FallbackStage
        if stage == "primary":
            stage_ = PrimaryStage(
                self.settings, self.catalog, clients, self.metrics, self._record_limits, self.spend
            )
            inputs, backfill = [topics.requests, topics.backfill], [topics.backfill]
        else:
            stage_ = FallbackStage(
                self.settings,
                self.catalog,
                clients["together"],
                self.metrics,
                self._record_limits,
                self.spend,
            )
            inputs, backfill = [topics.fallback], []

        def on_commit(seconds: float) -> None:
            self.metrics.observe_commit(group, seconds)

        return Engine(
            settings=self.settings,
            name=stage,
            group_id=group,
            topics=inputs,
            handler=stage_.handle,
            on_error=stage_.on_error,
            low_priority_topics=backfill,
            on_commit=on_commit,
            gate=self.spend,
            output_topics=stage_.output_topics,
        )


def spend_lanes(settings: Settings, catalog: Catalog) -> SpendLanes | None:
    """The worker's spend limits (None when none is set). A limit cannot hold for a model
    without a price: that is a start-up error naming them."""
    spend = settings.spend
    if spend.limit_usd is None and spend.backfill_limit_usd is None and not spend.model_limits:
        return None
    missing = unpriced(catalog)
    if missing:
        raise ConfigError(
            f"a spend limit is set, but {', '.join(missing)} have no price: give them one in "
            'STREAM_CATALOG_FILE ([prices] "id" = { input = USD, output = USD }, per 10⁶ tokens)'
        )
    unknown = sorted(set(spend.model_limits) - set(catalog.models))
    if unknown:
        raise ConfigError(f"STREAM_SPEND_MODEL_LIMITS names models not in the catalog: {unknown}")
    live = Budget(
        "live", limit_usd=spend.limit_usd, window_s=spend.window_s, model_limits=spend.model_limits
    )
    backfill = None
    if spend.backfill_limit_usd is not None:
        backfill = Budget("backfill", limit_usd=spend.backfill_limit_usd, window_s=spend.window_s)
    return SpendLanes(live, backfill, frozenset({Topics.of(settings).backfill}))


async def check_topics(settings: Settings) -> dict[str, int]:
    """Fail at start, in one line, when the pipeline's topics are missing; return the
    largest record each takes on the cluster (where this user may read it)."""
    wanted = set(vars(Topics.of(settings)).values())
    async with admin_client(settings.kafka, doing="checking topics") as admin:
        started = time.monotonic()
        # A cluster's brokers learn of new topics one after another: just after `stream
        # topics apply`, the broker asked may not know them yet. Ask again for a while.
        while missing := wanted - set(await admin.list_topics()):  # (the cluster's view)
            settle = _NO_TOPICS_SETTLE_S if missing == wanted else _TOPICS_SETTLE_S
            if time.monotonic() - started >= settle:
                break
            await anyio.sleep(0.5)
        limits = {} if missing else await topics.max_message_bytes(admin, sorted(wanted))
    if missing:
        user = settings.kafka.sasl_username
        # Kafka hides the topics a user may not describe: to it, they look missing.
        hint = (
            f", or grant Kafka user {user!r} ACLs on them (topics, groups and transactional "
            "ids under the prefix)"
            if user
            else ""
        )
        raise KafkaError(
            f"topics missing on {settings.kafka.bootstrap_servers}: {', '.join(sorted(missing))}"
            f"; create them with `stream topics apply`{hint}"
        )
    return limits


def tune_gc() -> None:
    """Fewer, cheaper cyclic-GC passes for a worker process (call once, after start-up).

    Every record allocates a few hundred short-lived objects that reference counting
    frees; the collector's default (a pass every 700 allocations) then mostly re-scans
    the long-lived ones: modules, schemas, the catalog, pooled connections. Freezing what
    exists after start-up takes those out of every pass, and a larger first generation
    makes passes rarer: 15-20% less CPU per request at full speed (`stream bench --latency 0`).
    A thousand calls in flight keep a few hundred thousand objects alive a second at a
    time, which the default-sized generations traverse again and again: 50,000 young
    objects per pass, and older generations collected 20 and 100 times less often, took the
    collector from ~12% of a worker's samples (py-spy) to ~1%, at L = 1 s and C = 1,000,
    for 8 MB more peak RSS.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    logs.configure(settings.log_level, json=True, content=settings.log_content)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.guarantee:
        settings = replace(settings, engine=replace(settings.engine, guarantee=args.guarantee))
    if args.instance_id is not None:
        if not args.instance_id.strip():  # "$POD_NAME" unset: not quietly a dynamic member
            raise UsageError(
                "--instance-id needs an id (got an empty one): leave it out to run without one"
            )
        instance_id = flag_value(check_instance_id, args.instance_id, "--instance-id")
        settings = replace(settings, engine=replace(settings.engine, instance_id=instance_id))
    if not anyio.run(run_until_signal, Worker(settings, stages, own_process=True)):
        # Exit 1 says it to a supervisor; the line, to the person who sent the signals.
        raise StreamError(
            "stopped by a second signal before the drain finished: the records still "
            "running were dropped uncommitted, and their next owner runs them again (calls "
            "already made are paid again); one SIGTERM, then the grace, drains"
        )
    return 0


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run the primary stage, the fallback stage, or both",
        description="Consume, call the provider, produce one terminal record per request. "
        "Scale out by running more processes with the same command.",
    )
    parser.add_argument(
        "stage", choices=[*STAGES, "all"], metavar="{" + ",".join([*STAGES, "all"]) + "}"
    )
    parser.add_argument(
        "--guarantee", choices=["at-least-once", "exactly-once"], help="overrides STREAM_GUARANTEE"
    )
    parser.add_argument(
        "--instance-id",
        metavar="ID",
        help="static group membership (overrides STREAM_INSTANCE_ID): a name that stays with "
        "this worker across restarts and no other running worker has, e.g. a StatefulSet's "
        "pod name; a restart with it keeps the partitions without a rebalance",
    )
    parser.set_defaults(handler=_run)
