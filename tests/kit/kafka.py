"""Kafka as the tests see it, without the code under test: topics, records written and read
back, end and committed offsets, commits as a group with no live member, hostile record
batches written as they are (`produce_batch`), and a broker of its own for a benchmark."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.producer.sender import Sender
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import OffsetAndMetadata

from stream.config import Settings
from stream.devtools.broker import LocalBroker, free_port
from stream.errors import ConfigError
from stream.kafka import admin_client, group_offsets, topic_partitions
from tests.kit import eventually

Client = TypeVar("Client", AIOKafkaConsumer, AIOKafkaProducer)


@asynccontextmanager
async def started(client: Client) -> AsyncIterator[Client]:
    """`client` started, and stopped on the way out, also when its start is cancelled (a
    test's deadline): aiokafka leaves what a cancelled start opened open, and a socket
    collected unclosed fails whichever test the collector happens to run in."""
    try:
        await client.start()
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.stop()


class Record(NamedTuple):
    """A record to write; Kafka picks what is left out (the partition from the key, the
    time from the clock)."""

    value: bytes | None
    key: bytes | None = None
    partition: int | None = None
    timestamp_ms: int | None = None
    headers: Sequence[tuple[str, bytes]] = ()


@contextmanager
def bootstrap_servers() -> Iterator[str]:
    """KAFKA_BOOTSTRAP_SERVERS when it is set; else a single-node broker of its own, on a
    free port, for the duration (a benchmark's)."""
    if bootstrap := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield bootstrap
        return
    with tempfile.TemporaryDirectory() as home:
        broker = LocalBroker(home=Path(home), port=free_port())
        broker.start()
        try:
            yield broker.bootstrap_servers
        finally:
            broker.stop()


async def create_topics(
    settings: Settings, counts: dict[str, int], configs: dict[str, str] | None = None
) -> list[str]:
    """Create each named topic under this test's prefix with its partition count; their
    full names, in order."""
    names = [settings.topic(name) for name in counts]
    async with admin_client(settings.kafka, doing="creating a test topic") as admin:
        await admin.create_topics(
            [
                NewTopic(name, count, 1, topic_configs=configs or {})
                for name, count in zip(names, counts.values(), strict=True)
            ]
        )
    return names


async def create_topic(
    settings: Settings, name: str, partitions: int, configs: dict[str, str] | None = None
) -> str:
    (topic,) = await create_topics(settings, {name: partitions}, configs)
    return topic


async def produce(
    settings: Settings,
    topic: str,
    records: Iterable[Record | bytes],
    *,
    max_request_size: int = 1_048_576,
) -> None:
    """Write `records` (bytes alone is a value) and wait until every one is acknowledged.
    `max_request_size`: the largest record the producer lets through (aiokafka's default)."""
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), acks="all", max_request_size=max_request_size
    )
    async with started(producer):
        pending = []
        for record in records:
            r = Record(record) if isinstance(record, bytes) else record
            headers = list(r.headers)
            pending.append(
                await producer.send(
                    topic,
                    r.value,
                    key=r.key,
                    partition=r.partition,
                    timestamp_ms=r.timestamp_ms,
                    headers=headers or None,
                )
            )
        for future in pending:
            await future


async def produce_batch(settings: Settings, tp: TopicPartition, batch: bytes) -> None:
    """Write a record batch as it is, in a produce request of its own (no producer builds
    a hostile one: they check a record's size before they compress)."""
    producer = AIOKafkaProducer(**settings.kafka.client_options())
    async with started(producer):
        await producer.client.force_metadata_update()
        leader = producer.client.cluster.leader_for_partition(tp)
        request = ProduceRequest(None, -1, 30_000, [(tp.topic, [(tp.partition, batch)])])
        response = await producer.client.send(leader, request)
        assert response.topics[0][1][0][1] == 0, response  # no error


def zstd_batch(values: Iterable[bytes]) -> bytes:
    """One zstd-compressed batch of records with `values`, no keys, no headers."""
    return _batch(4, [(value, []) for value in values])  # 4: zstd


def bad_key_batch(values: Sequence[bytes], bad: int) -> bytes:
    """One plain batch of records with `values`, the one at index `bad` carrying a header
    key that is not UTF-8 (which no Python client writes; the broker takes it)."""
    marker = "\x01bad-key\x01"  # as long as its replacement, and found once
    batch = bytearray(
        _batch(0, [(value, [(marker, b"")] if i == bad else []) for i, value in enumerate(values)])
    )
    at = batch.index(marker.encode())
    batch[at : at + len(marker)] = b"\xff\xfe" + bytes(len(marker) - 2)
    struct.pack_into(">I", batch, _CRC_AT, calc_crc32c(bytes(batch[_CRC_AT + 4 :])))
    return bytes(batch)


_CRC_AT = 17  # a v2 batch: base offset (8), length (4), leader epoch (4), magic (1), crc


def _batch(codec: int, records: Sequence[tuple[bytes, list[tuple[str, bytes]]]]) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=2**31 - 1,
    )
    for i, (value, headers) in enumerate(records):
        builder.append(i, timestamp=None, key=None, value=value, headers=headers)
    return bytes(builder.build())


async def read_all(
    settings: Settings, topic: str, *, isolation: str = "read_uncommitted"
) -> list[Any]:
    """Every record in `topic` up to its end offsets at the time of the call, in partition
    then offset order."""
    tps = await partitions(settings, topic)
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(), enable_auto_commit=False, isolation_level=isolation
    )
    async with started(consumer):
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
    return sorted(records, key=lambda r: (r.partition, r.offset))


async def partitions(settings: Settings, topic: str) -> list[TopicPartition]:
    """The topic's partitions, asked until the cluster knows them (a broker that just came
    back can answer metadata without its topics for a moment)."""
    found: list[TopicPartition] = []

    async def known() -> bool:
        try:
            found[:] = (await topic_partitions(settings.kafka, [topic]))[topic]
        except ConfigError:  # not in the metadata (yet)
            return False
        return bool(found)

    await eventually(known)
    return found


async def topic_configs(settings: Settings, topic: str) -> dict[str, str]:
    """The topic's configs as the cluster reports them, defaults included."""
    resource = ConfigResource(ConfigResourceType.TOPIC, topic)
    async with admin_client(settings.kafka, doing="describing a test topic") as admin:
        (response,) = await admin.describe_configs([resource])
    return {entry[0]: entry[1] for entry in response.resources[0][4]}


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    tps = await partitions(settings, topic)
    async with started(AIOKafkaConsumer(**settings.kafka.client_options())) as consumer:
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}


async def committed(settings: Settings, group: str, topic: str) -> dict[int, tuple[int, str]]:
    """partition → (offset, metadata) that `group` committed for `topic`."""
    tps = await partitions(settings, topic)
    async with admin_client(settings.kafka, doing="reading committed offsets") as admin:
        found = await group_offsets(admin, group, tps)
    return {tp.partition: (om.offset, om.metadata) for tp, om in found.items() if om.offset >= 0}


async def commit(
    settings: Settings, group: str, offsets: dict[TopicPartition, int], metadata: str = ""
) -> None:
    """Commit offsets as a group with no live member (as a stopped worker leaves them)."""
    # No auto-commit: it would commit the background fetch position on stop, over ours.
    consumer = AIOKafkaConsumer(
        group_id=group, enable_auto_commit=False, **settings.kafka.client_options()
    )
    async with started(consumer):
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(o, metadata) for tp, o in offsets.items()})


def stall_producer_starts(monkeypatch: pytest.MonkeyPatch) -> anyio.Event:
    """Producers started from now on stop in their start once Kafka has given their id (their
    coordinator's connection open); the event is set when one gets there."""
    waiting = anyio.Event()

    async def stalls(self: Sender) -> None:  # in place of its start: its routine never runs
        await self._maybe_wait_for_pid()
        waiting.set()
        await anyio.sleep_forever()

    monkeypatch.setattr(Sender, "start", stalls)
    return waiting


def has_connections(client: Any) -> bool:
    """Whether an aiokafka client (producer, consumer or admin) holds an open connection to
    a broker."""
    inner = client.client if isinstance(client, AIOKafkaProducer) else client._client
    return any(conn.connected() for conn in inner._conns.values())
