"""The primary stage's own CPU per record, without Kafka and without HTTP.

    .venv/bin/python bench/stage_bench.py [--records 20000] [--rounds 5] [--json]

`stream bench` measures the worker's CPU per request against the bare HTTP loop's; this
measures the part of the difference that is the stage's own work: decoding and validating
the request, building the result, its headers, the outcome metrics. Each record is the
bench's (`stream.devtools.benchdata.request_value`), handled by `PrimaryStage.handle` with
a provider client that answers at once with a fixed completion (its own cost, ~1 µs, is
counted too), and the worker's metrics and garbage-collector settings. Prints the median
of the rounds and their spread, in µs per record of this process's CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping
from typing import Any

import anyio
from aiokafka.structs import ConsumerRecord

from stream.catalog import Model, load_catalog
from stream.config import Settings
from stream.devtools.benchdata import request_value
from stream.observe.metrics import Metrics
from stream.providers import ProviderClient
from stream.providers.completion import Completion
from stream.stages import PrimaryStage, Topics
from stream.worker import tune_gc

ANSWER = "A partition is an ordered, append-only log of records. " * 3
USAGE: Mapping[str, Any] = {"prompt_tokens": 7, "completion_tokens": 39, "total_tokens": 46}


class AnsweringClient:
    """Answers every call at once: the stage's work is what is left to measure."""

    async def complete(self, model: Model, messages: Any, params: Any, **_: Any) -> Completion:
        return Completion(
            content=ANSWER,
            reasoning=None,
            usage=dict(USAGE),
            provider=model.provider,
            provider_model=model.api_model,
            attempts=1,
            latency_ms=1000.0,
            finish_reason="stop",
            provider_request_id="bench-1",
            cost_usd=0.0000321,
        )


def _records(count: int, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    now = int(time.time() * 1000)
    made = []
    for index in range(count):
        rid = f"stagebench-{index:07d}"
        key, value = rid.encode(), request_value(rid, index)
        headers = [("request-id", key)]
        made.append(
            ConsumerRecord(topic, index % 6, index, now, 0, key, value, None, 0, 0, headers)
        )
    return made


async def _round(stage: PrimaryStage, records: list[ConsumerRecord[bytes, bytes]]) -> float:
    started = time.process_time()
    for record in records:
        outputs = await stage.handle(record)
        assert outputs and outputs[0].topic.endswith("results"), "the stage did not answer"
    return (time.process_time() - started) / len(records) * 1_000_000


async def main(records: int, rounds: int) -> dict[str, Any]:
    tune_gc()
    settings = Settings.from_env({})
    client: Any = AnsweringClient()
    clients: dict[str, ProviderClient] = {"synthetic": client, "together": client}
    stage = PrimaryStage(settings, load_catalog(settings), clients, Metrics())
    batch = _records(records, Topics.of(settings).requests)
    await _round(stage, batch[: min(records, 2000)])  # warm-up: caches, label values
    figures = [await _round(stage, batch) for _ in range(rounds)]
    return {
        "records": records,
        "rounds": rounds,
        "us_per_record": round(statistics.median(figures), 2),
        "min": round(min(figures), 2),
        "max": round(max(figures), 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = anyio.run(main, args.records, args.rounds)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"primary stage, {result['records']} records × {result['rounds']} rounds: "
            f"{result['us_per_record']} µs CPU per record (median; "
            f"{result['min']}–{result['max']})"
        )
