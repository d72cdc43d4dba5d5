"""The aiokafka clients an engine runs on: its consumer and the sink for its outputs.

Sized for LLM work: minute-long calls must not get a member dropped from its group, and a
wave of answers finishing together must not wait on small producer batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition, codec

from stream.config import Settings
from stream.engine.assignor import Claims, StickyAssignor
from stream.engine.outputs import MAX_OUTPUT_BYTES, AtLeastOnceSink, Sink
from stream.engine.transactions import ExactlyOnceSink
from stream.errors import StreamError
from stream.inflate import bound_inflation

__all__ = ["OFFSET_RESET", "check_codecs", "make_consumer", "make_sink"]

# Where a group without commits starts: a new group must not skip what is already there.
OFFSET_RESET = "earliest"


def make_consumer(
    settings: Settings,
    group_id: str,
    instance_id: str | None,
    claims: Callable[[], Claims],
    handover: Callable[[set[TopicPartition]], None] = lambda tps: None,
) -> AIOKafkaConsumer:
    """A group consumer; `claims` tells the sticky assignor what this member owns, and
    `handover` hears what each assignment asks it to hand over."""
    check_codecs()
    bound_inflation(settings.kafka.max_batch_bytes)  # a bomb: dead letter, not memory
    config = settings.engine
    return AIOKafkaConsumer(
        **settings.kafka.client_options(),
        group_id=group_id,
        group_instance_id=instance_id,
        enable_auto_commit=False,
        auto_offset_reset=OFFSET_RESET,
        # Under either guarantee: a request an upstream wrote in a transaction it then
        # aborted was taken back, and running it would pay for a call nobody asked for
        # (and twice when the upstream writes it again). For producers without
        # transactions this changes nothing: their records are committed as written.
        isolation_level="read_committed",
        max_poll_interval_ms=config.max_poll_interval_ms,
        rebalance_timeout_ms=config.rebalance_timeout_ms,
        session_timeout_ms=config.session_timeout_ms,
        heartbeat_interval_ms=max(100, min(3000, config.session_timeout_ms // 3)),
        # Memory: aiokafka buffers at most one fetch per partition, bounded by these, and
        # keeps a fetch's bytes while any of its records waits: 256 KiB a partition is
        # more than the queue window of small records (a larger one still comes whole).
        max_partition_fetch_bytes=256 * 1024,
        fetch_max_bytes=4 * 1024 * 1024,
        max_poll_records=min(config.max_in_flight, 500),
        metadata_max_age_ms=config.metadata_max_age_ms,  # added partitions: in < 1 min
        # One strategy only. aiokafka 0.14 sends a JoinGroup per strategy offered, each
        # with a different protocol list, and a static member that changes its metadata
        # starts a new rebalance: two static workers offering two strategies could make
        # each other's SyncGroup fail for ever (seen: 1 start in 16 never settled).
        partition_assignment_strategy=(StickyAssignor(claims, handover),),
    )


def check_codecs() -> None:
    """Fail at start, not at the first compressed batch: producers compress with snappy,
    lz4 or zstd as often as not, and aiokafka reads those only with cramjam installed.
    Without it every fetch of such a batch fails, and the group crash-loops on it."""
    missing = [
        name
        for name, present in (
            ("snappy", codec.has_snappy),
            ("lz4", codec.has_lz4),
            ("zstd", codec.has_zstd),
        )
        if not present()
    ]
    if missing:
        raise StreamError(
            f"this install cannot read {', '.join(missing)}-compressed Kafka records (the "
            "cramjam package is missing): install the project's dependencies "
            "(pip install -e .) or pip install cramjam"
        )


def make_sink(
    settings: Settings, group_id: str, consumer: AIOKafkaConsumer, topics: Sequence[str] = ()
) -> Sink:
    """`topics`: the engine's inputs and outputs, whose metadata producers load at start."""
    # A dead letter carries its input base64-encoded: 1.4 MiB for the largest request
    # the topics take. Under aiokafka's 1 MiB default it could never be sent, and the
    # sink would retry it forever, stalling its partition.
    # Outputs finish in bursts (a wave of calls answers together): with the default
    # 16 KB batch, a partition's batch fills while the previous one awaits its ack and
    # every writer then waits for the drain. 256 KB absorbs a burst.
    # A record's outputs wait up to `linger_ms` for others to share their batch and produce
    # request (settings.kafka.linger_ms, 25 ms by default: Kafka's 5 ms made a produce
    # request per one or two outputs at 800 answers/s, ~6 % of the worker's CPU per
    # request); the at-least-once sink lingers in its own batches (stream.engine.batches).
    options: dict[str, Any] = {
        "linger_ms": settings.kafka.linger_ms,
        "max_request_size": MAX_OUTPUT_BYTES,
        "max_batch_size": 256 * 1024,
    }
    if settings.engine.guarantee == "exactly-once":
        return ExactlyOnceSink(settings.kafka, group_id, options, topics)
    return AtLeastOnceSink(settings.kafka, consumer, options, topics)
