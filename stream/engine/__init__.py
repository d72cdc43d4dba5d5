"""The Kafka engine: fetch, flow control, offsets, outputs and rebalance. It knows Kafka and
a handler `record → outputs`, nothing of LLMs; the pipeline plugs its stages in."""

from __future__ import annotations

from stream.engine.engine import (
    Engine,
    EngineSnapshot,
    ErrorHandler,
    Gate,
    Handler,
    run_until_signal,
)
from stream.engine.outputs import MAX_OUTPUT_BYTES, Output
from stream.engine.partitions import PartitionSnapshot, Record

__all__ = [
    "MAX_OUTPUT_BYTES",
    "Engine",
    "EngineSnapshot",
    "ErrorHandler",
    "Gate",
    "Handler",
    "Output",
    "PartitionSnapshot",
    "Record",
    "run_until_signal",
]
