"""Reproduces, on the pinned single-node broker alone, the duplicates the exactly-once
chaos run counted under load: a transaction committed as the broker stops (SIGTERM) is not
kept whole.

    python -m tests.txn_markers [--rounds 3]     # exit 1 when an output was committed twice

No engine is involved: transactional producers commit one output and the offset after it,
as an engine's partition does, the broker stops and starts, and each partition's next owner
fences the old producer, reads the committed offset and runs the record there again.

Kafka's controlled shutdown moves partition leadership away before a broker stops. A single
node has nowhere to move it: its partitions go leaderless while its transaction coordinator
still runs, and a transaction that commits in that window has its markers skipped ("Couldn't
find leader endpoint for partitions ... likely deleted already and hence can be skipped")
and is recorded as complete. Its records stay pending on each partition until the
producer's next marker there, which may belong to another transaction. The chaos run's
broker restart showed it under load: a worker's commit (outputs and consumer offsets) lost
its markers; the partition's next owner found no committed offset and ran the records again,
and its own commit marker then exposed the first outputs too (duplicate terminal records
under exactly-once); where the next marker was an abort, outputs were lost instead.
Without a controlled shutdown (controlled.shutdown.enable=false) it happens all the same,
on the way back up: the restarted node fences its own previous broker epoch, its partitions
are leaderless for a moment, and the markers of commits it finishes from its log are
skipped alike (Kafka 4.4.0).
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import sys
import tempfile
import uuid
from pathlib import Path

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from stream.config import Settings
from stream.devtools.broker import LocalBroker, free_port
from tests.kit.kafka import create_topics

PRODUCERS = 32  # transactions committing side by side, as a worker's partitions do


async def _commit_until_broken(
    settings: Settings, tid: str, topics: tuple[str, str], n: int
) -> None:
    """Commit transactions of one output and the offset after it, as an engine's partition
    does, until Kafka stops answering."""
    out, source = topics
    # Short requests: once the broker is gone, the loop should end soon.
    options = {**settings.kafka.client_options(), "request_timeout_ms": 5000}
    producer = AIOKafkaProducer(**options, transactional_id=tid)
    await producer.start()
    try:
        for offset in range(1_000_000):
            await producer.begin_transaction()
            # Outputs land on either partition, as a stage's results do by key: the
            # transaction after a commit need not touch the partitions that one did.
            await producer.send_and_wait(out, f"{n}:{offset}".encode(), partition=offset % 2)
            await producer.send_offsets_to_transaction(
                {TopicPartition(source, n): OffsetAndMetadata(offset + 1, "")},
                settings.topic("g"),
            )
            await producer.commit_transaction()
    except Exception:  # the broker went away: what it committed is the question
        pass
    finally:
        with anyio.move_on_after(10, shield=True):
            await producer.stop()


async def _take_over(settings: Settings, tid: str, topics: tuple[str, str], n: int) -> None:
    """What the partition's next owner does: fence, read the committed offset, run the
    record there and commit it."""
    out, source = topics
    tp = TopicPartition(source, n)
    producer = AIOKafkaProducer(**settings.kafka.client_options(), transactional_id=tid)
    await producer.start()  # fences the old producer; its open transaction is settled
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(), group_id=settings.topic("g"), enable_auto_commit=False
    )
    await consumer.start()
    try:
        offset = await _committed(consumer, tp)
        async with producer.transaction():
            await producer.send_and_wait(out, f"{n}:{offset}".encode(), partition=offset % 2)
            await producer.send_offsets_to_transaction(
                {tp: OffsetAndMetadata(offset + 1, "")}, settings.topic("g")
            )
    finally:
        await consumer.stop()
        await producer.stop()


async def _committed(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
    """The committed offset; asked again while the coordinator is still loading (aiokafka
    reads that answer as "nothing committed", and every partition here has commits)."""
    with anyio.fail_after(60):
        # (a state of the broker's, polled)
        while (offset := await consumer.committed(tp)) is None:  # noqa: ASYNC110
            await anyio.sleep(0.5)
    return int(offset)


async def _committed_values(settings: Settings, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(),
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        values: list[bytes] = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                values += [r.value for r in records if r.value is not None]
        return values
    finally:
        await consumer.stop()


async def one_round(home: Path) -> dict[bytes, int]:
    """Outputs committed more than once (value → times) after one stop and start."""
    broker = LocalBroker(home=home, port=free_port())
    await anyio.to_thread.run_sync(broker.start)
    try:
        settings = Settings.from_env(
            {
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                "STREAM_TOPIC_PREFIX": f"s{uuid.uuid4().hex[:6]}.",
            }
        )
        out, source = await create_topics(settings, {"out": 2, "in": PRODUCERS})
        tids = [settings.topic(f"tid-{n}") for n in range(PRODUCERS)]
        group_topics = (out, source)
        async with anyio.create_task_group() as group:
            for n, tid in enumerate(tids):
                group.start_soon(_commit_until_broken, settings, tid, group_topics, n)
            await anyio.sleep(3)  # transactions commit back to back
            await anyio.to_thread.run_sync(functools.partial(broker.stop, timeout_s=60))
            # aiokafka waits for a commit's end without a deadline: the loops end here.
            group.cancel_scope.cancel()
        await anyio.to_thread.run_sync(broker.start)
        for n, tid in enumerate(tids):
            await _take_over(settings, tid, group_topics, n)
        counts = collections.Counter(await _committed_values(settings, out))
    finally:
        await anyio.to_thread.run_sync(broker.stop)
    return {value: count for value, count in counts.items() if count > 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.txn_markers", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # reconnects while it stops
    doubled_rounds = 0
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="txn-markers-") as home:
            doubled = anyio.run(one_round, Path(home) / "kafka")
        doubled_rounds += bool(doubled)
        print(f"round {n + 1}: outputs committed twice: {doubled or 'none'}", flush=True)
    return 1 if doubled_rounds else 0


if __name__ == "__main__":
    sys.exit(main())
