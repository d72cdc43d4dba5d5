"""What `stream bench` reports: each run's figures over `--repeat` rounds, as a median and
its spread, the ratios of the worker to the baselines, and the table people read.

Rounds interleave the runs (stream, bare_http, …, stream, bare_http, …), so a busy moment
of a shared machine hits every run alike; a ratio is taken within each round (the worker
against the baseline measured beside it), then its median over the rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["Figures", "SPREAD", "summarise", "table"]

Figures = dict[str, Any]

# The figures whose spread over the rounds is reported beside their median.
SPREAD = ("throughput", "cpu_ms_per_request", "p50_ms", "first_ms", "peak_rss_mb")
# Figures of one run that are not measurements (the same in every round) or not numbers.
_FIXED = frozenset({"requests", "latency_s", "concurrency", "partitions", "spend_limit_usd"})


def _median(values: Sequence[float]) -> float:
    if all(isinstance(v, int) for v in values):
        return statistics.median_low(values)  # counts stay counts: the lower middle
    return round(statistics.median(values), 3)


def _summary(rounds: Sequence[Figures]) -> Figures:
    """One run's figures: the median of each measurement over the rounds, its spread."""
    first = rounds[0]
    summary: Figures = {}
    for key, value in first.items():
        values = [r[key] for r in rounds if isinstance(r.get(key), int | float)]
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if key in _FIXED or not numeric or len(values) != len(rounds):
            summary[key] = value
        else:
            summary[key] = _median(values)
    summary["spread"] = {
        key: [min(r[key] for r in rounds), max(r[key] for r in rounds)]
        for key in SPREAD
        if all(key in r for r in rounds)
    }
    summary["rounds"] = len(rounds)
    return summary


def _ratios(results: dict[str, list[Figures]], summary: dict[str, Figures]) -> None:
    """The worker against each baseline, round by round: throughput and CPU per request."""
    stream = results.get("stream")
    if stream is None:
        return
    for name, rounds in results.items():
        if name == "stream":
            continue
        pairs = list(zip(stream, rounds, strict=True))
        speed = [s["throughput"] / o["throughput"] for s, o in pairs]
        summary["stream"][f"ratio_{name}"] = _median(speed)
        summary["stream"][f"ratio_{name}_spread"] = [round(min(speed), 3), round(max(speed), 3)]
        if all(o["cpu_ms_per_request"] > 0 for _, o in pairs):
            cpu = [s["cpu_ms_per_request"] / o["cpu_ms_per_request"] for s, o in pairs]
            summary["stream"][f"cpu_ratio_{name}"] = _median(cpu)
            summary["stream"][f"cpu_ratio_{name}_spread"] = [round(min(cpu), 3), round(max(cpu), 3)]


def summarise(
    results: dict[str, list[Figures]], *, latency: float, concurrency: int, partitions: int
) -> dict[str, Figures]:
    """Each run's median figures (with `spread` and `repeats`, every round's own), the
    share of the C / L bound it reached, and the worker's ratios to the baselines."""
    bound = concurrency / latency if latency > 0 else None
    summary: dict[str, Figures] = {}
    for name, rounds in results.items():
        for figures in rounds:
            figures.update(latency_s=latency, concurrency=concurrency, partitions=partitions)
            if bound:
                figures["ratio_bound"] = round(figures["throughput"] / bound, 3)
        summary[name] = {**_summary(rounds), "repeats": rounds}
    _ratios(results, summary)
    return summary


# -- the table -----------------------------------------------------------------------------


def _with_spread(figures: Figures, key: str, width: int, digits: int) -> str:
    median = f"{figures[key]:.{digits}f}"
    low, high = figures["spread"].get(key, (None, None))
    if figures["rounds"] < 2 or low is None:
        return f"{median:>{width}}"
    return f"{median:>{width}} ({low:.{digits}f}–{high:.{digits}f})"


def table(summary: dict[str, Figures], *, header: str, rounds: int) -> list[str]:
    spread = rounds > 1
    rate_w, cpu_w, rss_w = (24, 24, 20) if spread else (9, 10, 11)
    lines = [
        header + (f"; median of {rounds} interleaved rounds (min–max)" if spread else ""),
        f"{'run':<13} {'requests':>8} {'req/s':>{rate_w}} {'first ms':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'calls/req':>9} {'CPU ms/req':>{cpu_w}} {'peak RSS MB':>{rss_w}}",
    ]
    for name, f in summary.items():
        lines.append(
            f"{name:<13} {f['requests']:>8} {_with_spread(f, 'throughput', 9, 1):>{rate_w}} "
            f"{f['first_ms']:>8.0f} {f['p50_ms']:>8.0f} {f['p99_ms']:>8.0f} "
            f"{f['calls_per_request']:>9.2f} "
            f"{_with_spread(f, 'cpu_ms_per_request', 10, 3):>{cpu_w}} "
            f"{_with_spread(f, 'peak_rss_mb', 5, 0):>{rss_w}}"
        )
    stream = summary.get("stream", {})
    lines += _ratio_lines(stream, spread)
    return lines


def _ratio_lines(stream: Figures, spread: bool) -> list[str]:
    def ratios(prefix: str) -> list[str]:
        out = []
        for key, value in stream.items():
            if key.startswith(prefix) and not key.endswith("_spread"):
                span = ""
                if spread and f"{key}_spread" in stream:
                    low, high = stream[f"{key}_spread"]
                    span = f" ({low:.2f}–{high:.2f})"
                out.append(f"{key[len(prefix) :]} {value:.2f}×{span}")
        return out

    lines = []
    if speed := ratios("ratio_"):
        lines.append("stream throughput vs " + ", ".join(speed))
    if cpu := ratios("cpu_ratio_"):
        lines.append("stream CPU per request vs " + ", ".join(cpu))
    return lines
