"""Consumer lag as Prometheus series, named the way Kafka operators already alert on them.

The per-partition and per-group series carry kafka-lag-exporter's names and labels
(`cluster_name`, `group`, `topic`, `partition`), so its alert rules and dashboards work on
them unchanged; only the window status (`stream_consumer_lag_status`) is ours. One
difference: lag here is the age of a real record, not an interpolation (see lagreader).

Exported once per group. Every worker reads the lag of its own stages' groups, but only one
member of each group exports it: the one whose engine holds the group's lowest partition
(by topic, then number) among those a live member owns, as DescribeGroups reported at the
monitor's last round. So `sum by (group)` counts each partition once, whatever the number
of replicas. `stream_lag_exporter{group}` says which worker it is (1) and which are not (0).
During a rebalance, until the next lag round (15 s), the group can have no exporter or two;
a group with no live member has none (its lag shows again once a worker joins it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from stream.observe.lag import LagMonitor, LagRow, nan_if_none
from stream.observe.lagstatus import Status

__all__ = ["Owned", "exported_groups", "lag_metrics"]

# (group, topic, partition) of every partition this process's engines hold now
Owned = Callable[[], Collection[tuple[str, str, int]]]

PARTITION = ["cluster_name", "group", "topic", "partition"]
GROUP = ["cluster_name", "group"]


def exported_groups(rows: Sequence[LagRow], owned: Collection[tuple[str, str, int]]) -> set[str]:
    """The groups whose lag this process exports: those whose lowest live-owned partition
    is one this process holds."""
    leaders: dict[str, tuple[str, int]] = {}
    for row in rows:
        key = (row.topic, row.partition)
        if row.owner is not None and (row.group not in leaders or key < leaders[row.group]):
            leaders[row.group] = key
    return {group for group, (topic, p) in leaders.items() if (group, topic, p) in owned}


def lag_metrics(monitors: Sequence[tuple[LagMonitor, Owned | None]]) -> Iterable[Metric]:
    """Every lag family: each monitor's rows for the groups this process exports (all of
    them for a monitor without `owned`: a process that exports for everyone)."""
    families = _Families()
    for monitor, owned in monitors:
        rows = monitor.rows()
        mine = {r.group for r in rows} if owned is None else exported_groups(rows, owned())
        cluster = monitor.cluster_name
        for group in monitor.groups:
            families.exporter.add_metric([group], float(group in mine))
        for group in sorted(mine):
            families.add_group(cluster, group, [r for r in rows if r.group == group])
    yield from families.all()
    yield from _monitor_metrics([monitor for monitor, _ in monitors])


class _Families:
    def __init__(self) -> None:
        gauge = GaugeMetricFamily
        self.offset = gauge(
            "kafka_consumergroup_group_offset",
            "The group's committed offset (NaN: it never committed this partition).",
            labels=PARTITION,
        )
        self.lag = gauge(
            "kafka_consumergroup_group_lag",
            "Records waiting: from the oldest unprocessed record to the log end "
            "(transaction markers alone are not lag; NaN: unknown).",
            labels=PARTITION,
        )
        self.seconds = gauge(
            "kafka_consumergroup_group_lag_seconds",
            "Age of the oldest unprocessed record, read from its timestamp (NaN: unknown).",
            labels=PARTITION,
        )
        self.max_lag = gauge(
            "kafka_consumergroup_group_max_lag", "The group's highest partition lag.", labels=GROUP
        )
        self.max_seconds = gauge(
            "kafka_consumergroup_group_max_lag_seconds",
            "The group's highest partition lag in seconds.",
            labels=GROUP,
        )
        self.sum_lag = gauge(
            "kafka_consumergroup_group_sum_lag",
            "The group's lag over all partitions.",
            labels=GROUP,
        )
        self.latest = gauge(
            "kafka_partition_latest_offset",
            "Log end offset (high watermark).",
            labels=["cluster_name", "topic", "partition"],
        )
        self.status = gauge(
            "stream_consumer_lag_status",
            "1 for the partition's window status (see `stream lag --help`), 0 for the others.",
            labels=[*PARTITION, "status"],
        )
        self.exporter = gauge(
            "stream_lag_exporter",
            "1 where this worker exports the group's lag series, 0 where another member does.",
            labels=["group"],
        )
        self._latest_seen: set[tuple[str, str, str]] = set()

    def add_group(self, cluster: str, group: str, rows: Sequence[LagRow]) -> None:
        for row in rows:
            key = [cluster, group, row.topic, str(row.partition)]
            self.offset.add_metric(key, nan_if_none(row.committed))
            self.lag.add_metric(key, nan_if_none(row.lag))
            self.seconds.add_metric(key, nan_if_none(row.lag_seconds))
            for each in Status:
                self.status.add_metric([*key, each.value], float(row.status is each))
            where = (cluster, row.topic, str(row.partition))
            if where not in self._latest_seen:  # one series per partition, however many groups
                self._latest_seen.add(where)
                self.latest.add_metric(list(where), nan_if_none(row.end))
        lags = [row.lag for row in rows if row.lag is not None]
        ages = [row.lag_seconds for row in rows if row.lag_seconds is not None]
        self.max_lag.add_metric([cluster, group], max(lags, default=math.nan))
        self.max_seconds.add_metric([cluster, group], max(ages, default=math.nan))
        self.sum_lag.add_metric([cluster, group], float(sum(lags)) if lags else math.nan)

    def all(self) -> tuple[Metric, ...]:
        return (
            self.offset,
            self.lag,
            self.seconds,
            self.max_lag,
            self.max_seconds,
            self.sum_lag,
            self.latest,
            self.status,
            self.exporter,
        )


def _monitor_metrics(monitors: Sequence[LagMonitor]) -> Iterable[Metric]:
    """How this worker's own lag reading goes (each worker reads, whoever exports)."""
    rounds = CounterMetricFamily("stream_lag_rounds", "Lag readings taken.", labels=[])
    errors = CounterMetricFamily("stream_lag_errors", "Lag readings that failed.", labels=[])
    last = GaugeMetricFamily(
        "stream_lag_last_success_timestamp_seconds",
        "When lag was last read successfully (NaN: never).",
        labels=[],
    )
    if monitors:
        rounds.add_metric([], sum(m.rounds for m in monitors))
        errors.add_metric([], sum(m.errors for m in monitors))
        successes = [m.last_success for m in monitors if m.last_success is not None]
        last.add_metric([], min(successes) if len(successes) == len(monitors) else math.nan)
    yield from (rounds, errors, last)
