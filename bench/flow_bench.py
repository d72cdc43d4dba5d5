"""Flow control's cost per finished record, without Kafka: `Flow.after_record` with a backlog.

    .venv/bin/python bench/flow_bench.py [--records 100000] [--rounds 5]

Six live partitions with a deep queue and six empty backfill ones (the primary stage's
shape), in-flight at its limit: each finished record starts the next one (handed back to
its task) and now and then walks the partitions to pause or resume them, as in the worker
at L = 1 s. Prints the median of the rounds and their spread, in µs of this process's CPU
per finished record (it includes the partition's own `done` and `start_next`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stream.config import Settings
from stream.engine.flow import Flow
from stream.engine.offsets import PartitionOffsets
from stream.engine.partitions import Partition


class _Record:
    def __init__(self, offset: int) -> None:
        self.offset, self.timestamp, self.key = offset, 0, None


class _Consumer:
    def pause(self, tp: TopicPartition) -> None:
        pass

    def resume(self, tp: TopicPartition) -> None:
        pass


def one_round(records: int) -> float:
    """CPU µs per finished record over `records` records."""
    config = replace(Settings.from_env({}).engine, max_in_flight=1000)
    partitions: dict[TopicPartition, Partition] = {}
    for index in range(12):
        low = index >= 6
        tp = TopicPartition("backfill" if low else "live", index)
        partition = Partition(tp, PartitionOffsets(0), low_priority=low, key_ordering=False)
        for offset in range(0 if low else records // 6 + 1000):
            partition.offsets.accept(offset)
            partition.enqueue(_Record(offset))  # type: ignore[arg-type]
        partitions[tp] = partition
    running: list[tuple[Partition, Any]] = []
    flow = Flow(config, partitions, lambda partition, record: running.append((partition, record)))
    flow.start_ready()
    consumer: Any = _Consumer()
    started = time.process_time()
    for _ in range(records):
        partition, record = running.pop()
        partition.done(record)
        flow.finished()
        if (following := flow.after_record(consumer)) is not None:
            running.append(following)
    return (time.process_time() - started) / records * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures = [one_round(args.records) for _ in range(args.rounds)]
    print(
        f"flow, {args.records} records × {args.rounds} rounds: "
        f"{statistics.median(figures):.2f} µs CPU per finished record "
        f"(median; {min(figures):.2f}–{max(figures):.2f})"
    )


if __name__ == "__main__":
    main()
