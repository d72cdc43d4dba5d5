"""What STREAM_KAFKA_COMPRESSION costs and saves, per result record, without a broker.

    .venv/bin/python bench/codec_bench.py [--batch 10] [--batches 2000] [--rounds 3] [--json]

Builds the producer's record batches exactly as aiokafka does (`DefaultRecordBatchBuilder`,
with cramjam's codecs) from result records whose content is English prose (this
project's README, cut into answers of ~1.2 KB, as `stream.records.result_record` writes
them), `--batch` records to a batch, and prints for each codec the CPU per record (median
of `--rounds`, with min–max) and the bytes a record takes in its batch. Real answers
compress less than repetitive test text and more than random bytes: prose is between.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from aiokafka.record.default_records import DefaultRecordBatchBuilder

from stream.records import Held, result_record

CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}  # Kafka's attribute ids
README = Path(__file__).resolve().parent.parent / "README.md"


def answers(count: int, size: int = 1200) -> list[bytes]:
    prose = " ".join(README.read_text().split())
    values = []
    for i in range(count):
        start = (i * 977) % (len(prose) - size)
        values.append(
            result_record(
                Held(request_id=f"req-{i:06d}", model="deepseek-v3-0324-syn", metadata=None),
                provider="synthetic",
                provider_model="hf:deepseek-ai/DeepSeek-V3-0324",
                content=prose[start : start + size],
                reasoning=None,
                usage={"prompt_tokens": 31, "completion_tokens": 260, "total_tokens": 291},
                attempts=1,
                latency_ms=812.5,
                fallback=False,
                finish_reason="stop",
                cost_usd=0.000281,
            )
        )
    return values


def one_round(codec: int, values: list[bytes], batch: int, batches: int) -> tuple[float, int]:
    """CPU µs per record, and bytes of all batches per record."""
    started = time.process_time()
    total = 0
    for n in range(batches):
        builder = DefaultRecordBatchBuilder(
            magic=2,
            compression_type=codec,
            is_transactional=0,
            producer_id=-1,
            producer_epoch=-1,
            base_sequence=-1,
            batch_size=256 * 1024,
        )
        for i in range(batch):
            value = values[(n * batch + i) % len(values)]
            builder.append(i, timestamp=None, key=b"req-key", value=value, headers=[])
        total += len(builder.build())
    records = batch * batches
    return (time.process_time() - started) / records * 1e6, total // records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=10, help="records per batch (default 10)")
    parser.add_argument("--batches", type=int, default=2000, help="batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    values = answers(500)
    figures = {}
    for name, codec in CODECS.items():
        rounds = [one_round(codec, values, args.batch, args.batches) for _ in range(args.rounds)]
        cpu = [us for us, _ in rounds]
        figures[name] = {
            "cpu_us_per_record": round(statistics.median(cpu), 2),
            "cpu_min": round(min(cpu), 2),
            "cpu_max": round(max(cpu), 2),
            "bytes_per_record": rounds[0][1],
        }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"result records of {len(values[0])} bytes, {args.batch} to a batch")
    print(f"{'codec':8} {'CPU µs/record':>24} {'bytes/record':>13}")
    for name, f in figures.items():
        spread = f"{f['cpu_us_per_record']:.1f} ({f['cpu_min']:.1f}–{f['cpu_max']:.1f})"
        print(f"{name:8} {spread:>24} {f['bytes_per_record']:>13}")


if __name__ == "__main__":
    main()
