"""The Kafka engine: fetch, flow control, offsets, outputs and rebalance. It knows Kafka and
a handler `record → outputs`, nothing of LLMs; the pipeline plugs its stages in."""

from __future__ import annotations

from stream.engine.engine import (
    Engine,
    EngineSnapshot,
    ErrorHandler,
    Gate,
    Handler,
)
from stream.engine.outputs import MAX_OUTPUT_BYTES, Output
from stream.engine.partitions import PartitionSnapshot, Record
from stream.engine.signals import run_until_signal

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
