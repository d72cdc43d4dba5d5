"""`stream bench --repeat`: medians, spreads and per-round ratios (pure, no Kafka)."""

from __future__ import annotations

import statistics

from hypothesis import given
from hypothesis import strategies as st

from stream.devtools.benchreport import summarise, table

rates = st.floats(min_value=1.0, max_value=10_000.0, allow_nan=False)
cpus = st.floats(min_value=0.01, max_value=10.0, allow_nan=False)


def _figures(rate: float, cpu: float, tokens: int = 10) -> dict[str, object]:
    return {
        "requests": 100,
        "throughput": rate,
        "first_ms": 500.0,
        "p50_ms": 900.0,
        "p99_ms": 1500.0,
        "calls_per_request": 1.0,
        "cpu_s": cpu / 10,
        "cpu_ms_per_request": cpu,
        "peak_rss_mb": 80.0,
        "completion_tokens": tokens,
        "guarantee_note": "text is kept as it is",
    }


@given(st.lists(st.tuples(rates, cpus, rates, cpus), min_size=1, max_size=7))
def test_medians_spreads_and_ratios_are_taken_per_round(
    rounds: list[tuple[float, float, float, float]],
) -> None:
    results = {
        "stream": [_figures(rate, cpu) for rate, cpu, _, _ in rounds],
        "bare_http": [_figures(rate, cpu) for _, _, rate, cpu in rounds],
    }
    summary = summarise(results, latency=1.0, concurrency=100, partitions=6)
    stream = summary["stream"]
    speeds = [s_rate / b_rate for s_rate, _, b_rate, _ in rounds]
    costs = [s_cpu / b_cpu for _, s_cpu, _, b_cpu in rounds]
    assert stream["rounds"] == len(rounds) and len(stream["repeats"]) == len(rounds)
    assert abs(stream["throughput"] - statistics.median(r[0] for r in rounds)) < 1e-3
    assert stream["spread"]["throughput"] == [min(r[0] for r in rounds), max(r[0] for r in rounds)]
    assert abs(stream["ratio_bare_http"] - statistics.median(speeds)) < 1e-3
    assert abs(stream["cpu_ratio_bare_http"] - statistics.median(costs)) < 1e-3
    low, high = stream["cpu_ratio_bare_http_spread"]
    assert low <= stream["cpu_ratio_bare_http"] <= high
    # one round: its own share of the bound (from its unrounded rate, as the report takes it)
    assert stream["ratio_bound"] == round(rounds[0][0] / 100, 3) or len(rounds) > 1
    # counts stay whole numbers, text stays text, fixed settings are not medians
    assert isinstance(stream["completion_tokens"], int)
    assert stream["guarantee_note"] == "text is kept as it is"
    assert stream["requests"] == 100 and stream["latency_s"] == 1.0


def test_the_table_shows_the_spread_only_over_several_rounds() -> None:
    one = summarise(
        {"stream": [_figures(90.0, 0.5)], "bare_http": [_figures(100.0, 0.4)]},
        latency=1.0,
        concurrency=100,
        partitions=6,
    )
    three = summarise(
        {
            "stream": [
                {**_figures(r, 0.5), "peak_rss_mb": rss}
                for r, rss in ((80.0, 290.0), (90.0, 281.0), (95.0, 301.0))
            ],
            "bare_http": [_figures(100.0, 0.4) for _ in range(3)],
        },
        latency=1.0,
        concurrency=100,
        partitions=6,
    )
    single = "\n".join(table(one, header="h", rounds=1))
    several = "\n".join(table(three, header="h", rounds=3))
    assert "–" not in single and "stream CPU per request vs bare_http 1.25×" in single
    assert "90.0 (80.0–95.0)" in several and "median of 3 interleaved rounds" in several
    assert "bare_http 0.90× (0.80–0.95)" in several
    assert "290 (281–301)" in several  # peak RSS: a target of its own, with its spread
