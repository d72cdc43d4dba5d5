"""Where outputs land (real broker): co-partitioning follows the input's partition when the
topics have as many partitions, and hashes the key otherwise."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from aiokafka.partitioner import DefaultPartitioner

from stream.config import EngineSettings, Settings
from stream.engine.engine import Engine, Output
from tests.kit.kafka import Record, create_topic, produce, read_all
from tests.kit.workers import engine_on

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _hashed(key: bytes, partitions: int) -> int:
    every = list(range(partitions))
    return int(DefaultPartitioner()(key, every, every))


async def test_outputs_follow_their_input_partition_or_hash_their_key(settings: Settings) -> None:
    source = await create_topic(settings, "co-in", 6)
    same = await create_topic(settings, "co-same", 6)
    fewer = await create_topic(settings, "co-fewer", 3)
    keys = [f"key-{i}".encode() for i in range(60)]
    # Each input sits where hashing would NOT put it, so only following can land it there.
    for partition in range(6):
        mine = [key for key in keys if (_hashed(key, 6) + 1) % 6 == partition]
        await produce(settings, source, [Record(key, key, partition) for key in mine])
    done = anyio.Event()
    handled = 0

    async def handler(record: Any) -> Sequence[Output]:
        nonlocal handled
        handled += 1
        if handled == len(keys):
            done.set()
        follows = record.partition
        return [
            Output(same, record.value, record.key, follows=follows),  # follows
            Output(fewer, record.value, record.key, follows=follows),  # 3 ≠ 6: hashed
            Output(same, b"plain:" + record.value, record.key),  # not asked: hashed
        ]

    engine = Engine(
        settings=dataclasses.replace(
            settings, engine=EngineSettings(commit_interval_s=0.2, max_in_flight=100)
        ),
        name="t",
        group_id=settings.group("co-partition"),
        topics=[source],
        handler=handler,
        on_error=lambda record, exc: [],
    )
    async with engine_on(engine):
        await done.wait()

    inputs = {r.key: r.partition for r in await read_all(settings, source)}
    written = await read_all(settings, same)
    followed = {r.key: r.partition for r in written if r.value == r.key}
    plain = {r.key: r.partition for r in written if r.value != r.key}
    hashed = {r.key: r.partition for r in await read_all(settings, fewer)}
    assert followed == inputs  # keys kept, partitions followed
    assert plain == {key: _hashed(key, 6) for key in keys}
    assert hashed == {key: _hashed(key, 3) for key in keys}
