"""Tallies export exactly what prometheus_client's own Counter and Histogram would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from stream.observe.metrics import LLM_BUCKETS
from stream.observe.tally import CounterTally, HistogramTally

labels = st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["2xx", "5xx", "timeout"]))
# values on the bounds too: a value equal to a bound counts in that bucket
values = st.one_of(
    st.sampled_from(LLM_BUCKETS).map(float),
    st.floats(min_value=0, max_value=1000, allow_nan=False),
)


def _exposition(collector: object) -> str:
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    return generate_latest(registry).decode()


@given(st.lists(st.tuples(labels, values), max_size=40))
def test_a_histogram_tally_matches_prometheus_client(
    observed: list[tuple[tuple[str, str], float]],
) -> None:
    registry = CollectorRegistry()
    reference = Histogram("h", "doc", ["model", "status"], buckets=LLM_BUCKETS, registry=registry)
    tally = HistogramTally("h", "doc", ["model", "status"], LLM_BUCKETS)
    for key, value in observed:
        reference.labels(*key).observe(value)
        tally.observe(key, value)
    ours = _exposition(tally)
    theirs = "".join(
        line + "\n"
        for line in generate_latest(registry).decode().splitlines()
        if "_created" not in line
    )
    assert sorted(ours.splitlines()) == sorted(theirs.splitlines())


@given(st.lists(st.tuples(labels, st.integers(min_value=0, max_value=10**6)), max_size=40))
def test_a_counter_tally_matches_prometheus_client(
    observed: list[tuple[tuple[str, str], int]],
) -> None:
    registry = CollectorRegistry()
    reference = Counter("c", "doc", ["model", "status"], registry=registry)
    tally = CounterTally("c", "doc", ["model", "status"])
    for key, amount in observed:
        reference.labels(*key).inc(amount)
        tally.inc(key, amount)
    theirs = [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]
    assert sorted(_exposition(tally).splitlines()) == sorted(theirs)
