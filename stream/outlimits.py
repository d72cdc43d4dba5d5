"""How large a stage's outputs may be: the largest record each output topic takes, and
what a record weighs against it.

A record over its topic's `max.message.bytes` is refused by the broker on every try:
at-least-once would retry it for ever, exactly-once fail its transaction at every
restart. So a stage checks its outputs before it hands them over: a result too large
becomes a dead letter (`result_too_large`), a dead letter too large goes without the
input's bytes (`omitted`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from stream import topics
from stream.config import Settings
from stream.engine import MAX_OUTPUT_BYTES, Output

__all__ = ["KEY_KEPT_BYTES", "OutputLimits", "inputs_fit", "record_size"]

# Kafka's default max.message.bytes, for a topic that declares none.
_KAFKA_MAX_MESSAGE_BYTES = 1_048_588
# Room for a record batch's framing, beside the record's value, key and headers.
_FRAMING_BYTES = 512
# A dead letter too large to write keeps the input's key up to this size (else none).
KEY_KEPT_BYTES = 16 * 1024


class OutputLimits:
    """The largest record each topic takes: as declared in topics/, or as the cluster has
    it when smaller (drift), and never more than the engine's producer sends."""

    def __init__(self, settings: Settings, cluster_limits: Mapping[str, int] | None) -> None:
        self._declared = {
            spec.name: int(spec.configs.get("max.message.bytes", _KAFKA_MAX_MESSAGE_BYTES))
            for spec in topics.load_specs(settings.topics_dir, prefix=settings.topic_prefix)
        }
        self._cluster = cluster_limits or {}

    def largest(self, topic: str) -> int:
        """The largest record (value, key and headers) `topic` takes."""
        return (
            min(
                self._declared.get(topic, _KAFKA_MAX_MESSAGE_BYTES),
                self._cluster.get(topic, MAX_OUTPUT_BYTES),
                MAX_OUTPUT_BYTES,
            )
            - _FRAMING_BYTES
        )


class _Input(Protocol):
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


def inputs_fit(record: _Input, *, limit: int) -> bool:
    """Whether a dead letter could carry `record`'s bytes (as base64, a third more) and key
    within `limit`, judged before it is built: a 200 MB value arriving compressed cost five
    times that in copies when the dead letter was built first and measured after. (A
    request that parsed passed the size limit for requests: nothing to judge.)"""
    raw = 4 * -(-len(record.value or b"") // 3)  # base64: 4 characters per 3 bytes begun
    return raw + len(record.key or b"") <= limit


def record_size(output: Output) -> int:
    """What a record of `output` weighs against max.message.bytes (framing aside)."""
    headers = sum(len(key) + len(value) for key, value in output.headers)
    return len(output.value) + len(output.key or b"") + headers
