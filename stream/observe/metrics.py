"""Prometheus metrics for a worker, in their own registry (never the global one).

Three ways in, all cheap:
- the stages and the engine call methods: `record_outcome`, `record_fallback`,
  `observe_commit`;
- the provider client calls the observer protocol (`ProviderObserver`): `on_attempt`,
  `on_retry`, `on_breaker`;
- at scrape time a collector copies what is already in memory: each watched engine's
  `snapshot()` and each `LagMonitor`'s cached rows (`stream.observe.lagmetrics`, under
  kafka-lag-exporter's names). A scrape never talks to Kafka.

Names are `stream_…` in base units (seconds), counters end in `_total` (and export no
`_created` series), and labels are bounded: label values are cleaned and, past
`MAX_LABEL_VALUES` distinct values for one label, folded into "other" — a request id can
never become a time series. Unknown is NaN, never 0. The README lists every series.

Counters and histograms updated per record are tallies (`stream.observe.tally`): plain
numbers without a lock, read at scrape time, both on the event loop's thread.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from stream.engine import EngineSnapshot, PartitionSnapshot
from stream.observe.lag import LagMonitor
from stream.observe.lagmetrics import Owned, lag_metrics
from stream.observe.tally import CounterTally, HistogramTally
from stream.prices import TokenCounts, token_counts
from stream.providers.observer import ProviderObserver

__all__ = [
    "BREAKER_STATES",
    "LLM_BUCKETS",
    "MAX_LABEL_VALUES",
    "Metrics",
    "SnapshotSource",
]

# `*_created` series double every counter and histogram and nobody queries them. The switch
# is prometheus_client's, process-wide, read at scrape time.
disable_created_metrics()  # type: ignore[no-untyped-call]

# LLM calls run from tens of milliseconds (a cached or rejected call) to minutes (reasoning).
LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 90, 120, 180, 240, 300)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BREAKER_STATES = ("closed", "open", "half_open")
STATUS_CLASSES = frozenset({"1xx", "2xx", "3xx", "4xx", "5xx", "timeout", "connect"})
OUTCOMES = frozenset({"result", "fallback", "dead_letter"})
MAX_LABEL_VALUES = 200
TOKEN_KINDS = TokenCounts._fields

_CLEAN = re.compile(r"[^A-Za-z0-9_.:/\-]")


class SnapshotSource(Protocol):
    def snapshot(self) -> EngineSnapshot: ...


class _Labels:
    """Keeps label values clean and bounded in number."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._limit = limit
        self._seen: dict[str, set[str]] = {}
        # (label, value as given) → its label value, for values seen before (most calls):
        # no regex then. Bounded like the values themselves.
        self._known: dict[tuple[str, str], str] = {}

    def __call__(self, label: str, value: str) -> str:
        known = self._known.get((label, value))
        if known is not None:
            return known
        clean = _CLEAN.sub("_", value)[:100] or "none"
        seen = self._seen.setdefault(label, set())
        if clean not in seen:
            if len(seen) >= self._limit:
                return "other"
            seen.add(clean)
        if len(self._known) < 10 * self._limit:
            self._known[(label, value)] = clean
        return clean


class Metrics(ProviderObserver):
    """A worker's metrics: the observer the provider client calls, and what stages call."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._label = _Labels()
        self._engines: list[SnapshotSource] = []
        self._monitors: list[tuple[LagMonitor, Owned | None]] = []
        self._breakers: set[tuple[str, str]] = set()
        self.records = CounterTally(
            "stream_records",
            "Records a stage finished with, by outcome (and dead-letter reason).",
            ["stage", "outcome", "reason"],
        )
        self.attempts = HistogramTally(
            "stream_provider_request_duration_seconds",
            "Duration of one provider call attempt, by HTTP status class.",
            ["provider", "model", "status_class"],
            LLM_BUCKETS,
        )
        self.retries = CounterTally(
            "stream_provider_retries",
            "Provider call attempts that were retried, by error type.",
            ["provider", "model", "error_type"],
        )
        # Changes only with the breaker's state: prometheus_client's own gauge.
        self.breaker = Gauge(
            "stream_breaker_state",
            "1 for the circuit breaker's state per provider and model, 0 for the others.",
            ["provider", "model", "state"],
            registry=self.registry,
        )
        self.breaker_changes = CounterTally(
            "stream_breaker_transitions",
            "Circuit breaker transitions, by the state entered.",
            ["provider", "model", "state"],
        )
        self.fallbacks = CounterTally(
            "stream_fallbacks",
            "Requests handed from a primary model to its fallback model.",
            ["from_model", "to_model"],
        )
        self.commit_duration = HistogramTally(
            "stream_commit_duration_seconds",
            "Duration of one offset commit (or transaction commit).",
            ["group"],
            COMMIT_BUCKETS,
        )
        self._answers()
        self._budgets: list[BudgetSource] = []
        tallies: list[_Tally] = [self.records, self.attempts, self.retries, self.breaker_changes]
        tallies += [self.fallbacks, self.commit_duration, self.tokens, self.spend]
        tallies += [self.finish_reasons, self.repeats, self.usage_problems]
        self.registry.register(_TallyCollector(tallies))
        self.registry.register(_SpendCollector(self._budgets))
        self.registry.register(_SnapshotCollector(self._engines, self._monitors))

    def _answers(self) -> None:
        """What answers were and cost (issue 13): kept together for an easy merge."""
        pm = ["provider", "model"]
        self.tokens = CounterTally(
            "stream_provider_tokens",
            "Tokens billed, by kind: prompt (cached included), cached (of prompt), "
            "completion (reasoning included), reasoning (of completion).",
            [*pm, "kind"],
        )
        self.spend = CounterTally(
            "stream_provider_spend_usd",
            "What provider answers cost at the catalog's prices, in USD.",
            pm,
        )
        self.finish_reasons = CounterTally(
            "stream_provider_answers",
            "Answers billed, by finish reason (length: cut at max_tokens; content_filter).",
            [*pm, "finish_reason"],
        )
        self.usage_problems = CounterTally(
            "stream_provider_usage_problems",
            "Answers billed whose usage was missing (cost unknown: the spend limit counts "
            "what was held) or implausible (over the context: charged at that bound).",
            [*pm, "problem"],
        )
        self.repeats = CounterTally(
            "stream_repeated_calls",
            "Provider calls for a request run again on purpose, by cause (replay, redrive); "
            "re-runs after a crash or rebalance are stream_engine_records_redelivered_total.",
            ["stage", "cause"],
        )

    # --- the provider client (ProviderObserver) --------------------------------------------

    def on_attempt(self, provider: str, model: str, status_class: str, seconds: float) -> None:
        status_class = status_class if status_class in STATUS_CLASSES else "other"
        labels = self._pm(provider, model)
        self.attempts.observe((*labels, status_class), seconds)
        if labels not in self._breakers:  # a model called: its breaker shows, closed
            self._set_breaker(labels, "closed")

    def on_retry(self, provider: str, model: str, error_type: str) -> None:
        self.retries.inc((*self._pm(provider, model), self._label("error_type", error_type)))

    def on_breaker(self, provider: str, model: str, state: str) -> None:
        if state not in BREAKER_STATES:
            raise ValueError(f"breaker state must be one of {BREAKER_STATES}, not {state!r}")
        labels = self._pm(provider, model)
        self._set_breaker(labels, state)
        self.breaker_changes.inc((*labels, state))

    def _set_breaker(self, labels: tuple[str, str], state: str) -> None:
        self._breakers.add(labels)
        for each in BREAKER_STATES:
            self.breaker.labels(*labels, each).set(float(each == state))

    def on_answer(
        self,
        provider: str,
        model: str,
        finish_reason: str | None,
        usage: Mapping[str, Any] | None,
        cost_usd: float | None,
    ) -> None:
        labels = self._pm(provider, model)
        finish = self._label("finish_reason", finish_reason) if finish_reason else "none"
        self.finish_reasons.inc((*labels, finish))
        counts = token_counts(usage)
        if counts is not None:
            provider, model = labels
            for kind, value in zip(TOKEN_KINDS, counts, strict=True):
                self.tokens.inc((provider, model, kind), value)
        if cost_usd:
            self.spend.inc(labels, cost_usd)

    def on_usage_problem(self, provider: str, model: str, problem: str) -> None:
        labels = self._pm(provider, model)
        self.usage_problems.inc((*labels, self._label("problem", problem)))

    def watch_budgets(self, budgets: Iterable[BudgetSource]) -> None:
        """Publish each spend budget's window at every scrape."""
        self._budgets.extend(budgets)

    def record_repeat(self, stage: str, cause: str) -> None:
        """A provider call for a request that may have been answered before."""
        self.repeats.inc((self._label("stage", stage), self._label("cause", cause)))

    # --- stages and engine -----------------------------------------------------------------

    def record_outcome(self, stage: str, outcome: str, reason: str | None = None) -> None:
        """A record left `stage` as a result, a fallback or a dead letter (with its reason)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")
        reason_label = self._label("reason", reason) if reason else ""
        self.records.inc((self._label("stage", stage), outcome, reason_label))

    def record_fallback(self, from_model: str, to_model: str) -> None:
        self.fallbacks.inc(
            (self._label("from_model", from_model), self._label("to_model", to_model))
        )

    def observe_commit(self, group: str, seconds: float) -> None:
        self.commit_duration.observe((self._label("group", group),), seconds)

    def watch_engine(self, engine: SnapshotSource) -> None:
        """Read `engine.snapshot()` at every scrape."""
        self._engines.append(engine)

    def watch_lag(self, monitor: LagMonitor, *, owned: Owned | None = None) -> None:
        """Publish `monitor`'s cached lag rows at every scrape: for the groups this process
        exports (`owned` says which partitions its engines hold; without it, every group)."""
        self._monitors.append((monitor, owned))

    def exposition(self) -> bytes:
        """The Prometheus text format of everything in this registry."""
        return generate_latest(self.registry)

    def _pm(self, provider: str, model: str) -> tuple[str, str]:
        return self._label("provider", provider), self._label("model", model)


class BudgetView(Protocol):
    """The shape of `stream.spend.BudgetSnapshot`."""

    @property
    def name(self) -> str: ...
    @property
    def limit_usd(self) -> float | None: ...
    @property
    def spent_usd(self) -> float: ...
    @property
    def held_usd(self) -> float: ...
    @property
    def limited(self) -> bool: ...
    @property
    def by_model(self) -> dict[str, float]: ...


class BudgetSource(Protocol):
    def snapshot(self) -> BudgetView: ...


class _Tally(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class _TallyCollector:
    def __init__(self, tallies: Sequence[_Tally]) -> None:
        self._tallies = tallies

    def collect(self) -> Iterable[Metric]:
        for tally in self._tallies:
            yield from tally.collect()


class _SpendCollector:
    """The spend limits at scrape time: in the window, held, the limit, and whether the
    worker is held back by it (`stream_spend_limited`, what alerts watch)."""

    def __init__(self, budgets: list[BudgetSource]) -> None:
        self._budgets = budgets

    def collect(self) -> Iterable[Metric]:
        snaps = [budget.snapshot() for budget in self._budgets]
        limited = GaugeMetricFamily(
            "stream_spend_limited",
            "1 while the spend limit holds this worker's partitions (paused, lag grows).",
            labels=["budget"],
        )
        spent = GaugeMetricFamily(
            "stream_spend_window_usd", "Spent in the current window, USD.", labels=["budget"]
        )
        held = GaugeMetricFamily(
            "stream_spend_held_usd", "Held for calls in flight, USD.", labels=["budget"]
        )
        limit = GaugeMetricFamily(
            "stream_spend_limit_usd", "The limit per window, USD (NaN: none).", labels=["budget"]
        )
        by_model = GaugeMetricFamily(
            "stream_spend_window_model_usd",
            "Spent in the current window per model, USD.",
            labels=["budget", "model"],
        )
        for snap in snaps:
            limited.add_metric([snap.name], float(snap.limited))
            spent.add_metric([snap.name], snap.spent_usd)
            held.add_metric([snap.name], snap.held_usd)
            limit.add_metric([snap.name], math.nan if snap.limit_usd is None else snap.limit_usd)
            for model, usd in sorted(snap.by_model.items())[:MAX_LABEL_VALUES]:
                by_model.add_metric([snap.name, model], usd)
        yield from (limited, spent, held, limit, by_model)


class _SnapshotCollector:
    """Reads in-memory state at scrape time: engine snapshots and cached lag rows."""

    def __init__(
        self, engines: list[SnapshotSource], monitors: list[tuple[LagMonitor, Owned | None]]
    ) -> None:
        self._engines = engines
        self._monitors = monitors

    def collect(self) -> Iterable[Metric]:
        yield from _engine_metrics([engine.snapshot() for engine in self._engines])
        yield from lag_metrics(self._monitors)


def _engine_metrics(snapshots: Sequence[EngineSnapshot]) -> Iterable[Metric]:
    labels = ["engine", "group"]
    gauges: dict[str, tuple[str, Callable[[EngineSnapshot], float]]] = {
        "stream_engine_assigned_partitions": ("Partitions assigned.", lambda s: s.assigned),
        "stream_in_flight": ("Records being processed now.", lambda s: s.in_flight),
        "stream_engine_last_commit_timestamp_seconds": (
            "Unix time of the engine's last successful commit (0 before the first).",
            lambda s: s.last_commit_seconds,
        ),
        "stream_engine_output_wait_seconds": (
            "How long the oldest write of outputs has waited for Kafka (0: none waits).",
            lambda s: max((p.oldest_write_s or 0.0 for p in s.partitions), default=0.0),
        ),
    }
    counters: dict[str, tuple[str, Callable[[EngineSnapshot], float]]] = {
        "stream_engine_records_in": ("Records taken from Kafka.", lambda s: s.records_in),
        "stream_engine_records_done": ("Records finished.", lambda s: s.records_done),
        "stream_engine_handler_errors": ("Handler errors.", lambda s: s.handler_errors),
        "stream_engine_commits": ("Offset commits.", lambda s: s.commits),
        "stream_engine_records_redelivered": (
            "Records started again that a previous owner had started (crash, rebalance): "
            "each may be a provider call paid twice.",
            lambda s: s.records_redelivered,
        ),
        "stream_engine_records_recovered": (
            "Records a dead owner finished after its last commit, found by their outputs in "
            "Kafka (at-least-once): not run, nor paid for, again.",
            lambda s: s.records_recovered,
        ),
        "stream_engine_records_released": (
            "Records a shutdown drain or a handover gave back before their call went out "
            "(waiting for the spend limit, a slot or a back-off): nothing paid, their next "
            "owner runs them.",
            lambda s: s.records_released,
        ),
        "stream_engine_rebalances": (
            "Rebalances that revoked the engine's partitions.",
            lambda s: s.rebalances,
        ),
        "stream_engine_records_abandoned": (
            "Running records abandoned because their partition moved to another worker (or "
            "the shutdown grace ran out): their next owner calls the provider again.",
            lambda s: s.abandoned,
        ),
    }
    for kind, table in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
        for name, (doc, value) in table.items():
            family = kind(name, doc, labels=labels)
            for snap in snapshots:
                family.add_metric([snap.name, snap.group_id], value(snap))
            yield family
    info = GaugeMetricFamily(
        "stream_engine_info", "Engine settings.", labels=[*labels, "guarantee"]
    )
    for snap in snapshots:
        info.add_metric([snap.name, snap.group_id, snap.guarantee], 1)
    yield info
    yield from _partition_metrics(snapshots)


def _partition_metrics(snapshots: Sequence[EngineSnapshot]) -> Iterable[Metric]:
    now_ms = time.time() * 1000
    labels = ["engine", "topic", "partition"]
    values: dict[str, tuple[str, Callable[[PartitionSnapshot], float]]] = {
        "stream_partition_in_flight": ("Records in flight.", lambda p: p.in_flight),
        "stream_partition_finished_uncommitted": (
            "Records finished above the committed watermark (not yet committed).",
            lambda p: p.finished_uncommitted,
        ),
        "stream_partition_paused": ("1 while the partition's window is full.", lambda p: p.paused),
        "stream_partition_next_offset": ("Next offset to fetch.", lambda p: p.next_offset),
        "stream_partition_oldest_in_flight_age_seconds": (
            "Age of the oldest record in flight (NaN when none).",
            lambda p: _age_s(p.oldest_in_flight_timestamp_ms, now_ms),
        ),
    }
    for name, (doc, value) in values.items():
        family = GaugeMetricFamily(name, doc, labels=labels)
        for snap in snapshots:
            for part in snap.partitions:
                family.add_metric([snap.name, part.topic, str(part.partition)], value(part))
        yield family


def _age_s(timestamp_ms: int | None, now_ms: float) -> float:
    return math.nan if timestamp_ms is None else max(0.0, (now_ms - timestamp_ms) / 1000)
