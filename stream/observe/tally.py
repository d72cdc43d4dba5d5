"""Counters and histograms kept as plain numbers, turned into Prometheus families at scrape.

prometheus_client's `Counter.inc` and `Histogram.observe` take a lock on every update (they
may be called from any thread) and find their child through `labels()` each time: per record
at a thousand records a second, that was a few per cent of a worker's CPU. The worker's
updates and its scrapes all run on one event loop thread, so a tally is a dict of numbers
keyed by the label values: an update is a dict look-up and an addition, and a scrape
(`collect`) copies the dict before reading it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

__all__ = ["CounterTally", "HistogramTally"]

Labels = tuple[str, ...]


class CounterTally:
    """A counter per label values: `inc(("a", "b"))`, exported as `<name>_total`."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self._documentation = documentation
        self._labels = list(labels)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self._documentation, labels=self._labels)
        for labels, value in list(self.values.items()):
            family.add_metric(list(labels), value)
        yield family


class _Series:
    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last one is +Inf's
        self.total = 0.0


class HistogramTally:
    """A histogram per label values, with Prometheus's cumulative `le` buckets."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._bounds = sorted(float(b) for b in buckets)
        self._les = [_le(b) for b in self._bounds] + ["+Inf"]
        self._series: dict[Labels, _Series] = {}

    def observe(self, labels: Labels, value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series(len(self._bounds))
        # the first bound >= value: a value on a bound counts in that bucket (le: "<=")
        series.counts[bisect_left(self._bounds, value)] += 1
        series.total += value

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self._documentation, labels=self._labels)
        for labels, series in list(self._series.items()):
            running, buckets = 0, []
            for le, count in zip(self._les, list(series.counts), strict=True):
                running += count
                buckets.append((le, float(running)))
            family.add_metric(list(labels), buckets, sum_value=series.total)
        yield family


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it (`30.0`, `0.05`)."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text
