"""The engine's two small seams for issue 13, against a real broker: a gate that holds a
topic's records back (partitions paused, a `held` note in the commit), and the `started`
note that lets the next owner count the records it runs again after a previous owner."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from hypothesis import given
from hypothesis import strategies as st

from stream.config import EngineSettings, Settings
from stream.engine.engine import Engine, Output
from stream.engine.offsets import decode_metadata, encode_metadata, split_notes, with_notes
from tests.kit import eventually
from tests.kit.kafka import committed, create_topic, produce
from tests.kit.workers import engine_on

pytestmark = pytest.mark.anyio


@given(
    watermark=st.integers(0, 10**9),
    gaps=st.lists(st.integers(1, 50), max_size=30),
    notes=st.dictionaries(st.sampled_from(["held", "started", "x"]), st.text(max_size=20)),
)
def test_notes_never_change_what_the_offsets_say(
    watermark: int, gaps: list[int], notes: dict[str, str]
) -> None:
    finished, at = [], watermark
    for gap in gaps:
        at += gap
        finished.append(at)
    plain = encode_metadata(watermark, finished)
    noted = with_notes(plain, notes)
    assert decode_metadata(noted, watermark) == decode_metadata(plain, watermark) == finished
    head, read = split_notes(noted)
    assert head == plain and set(read) == set(notes)
    assert all("~" not in value for value in read.values())


class Switch:
    """A gate that holds every topic while `reason` is set."""

    def __init__(self) -> None:
        self.reason: str | None = "test_hold"

    def holds(self, topic: str) -> str | None:
        return self.reason


def _settings(settings: Settings) -> Settings:
    engine = {**dataclasses.asdict(settings.engine), "commit_interval_s": 0.1}
    return dataclasses.replace(settings, engine=EngineSettings(**engine))


def _engine(settings: Settings, source: str, group: str, handler: Any, gate: Any = None) -> Engine:
    def on_error(record: Any, exc: BaseException) -> Sequence[Output]:
        return []

    return Engine(
        settings=_settings(settings),
        name="gate",
        group_id=settings.group(group),
        topics=[source],
        handler=handler,
        on_error=on_error,
        gate=gate,
    )


def _keeping(expected: int) -> tuple[Any, anyio.Event, list[bytes]]:
    """A handler that keeps the values it gets and writes nothing; the event fires once
    `expected` came."""
    done, kept = anyio.Event(), []

    async def handler(record: Any) -> Sequence[Output]:
        kept.append(record.value)
        if len(kept) == expected:
            done.set()
        return []

    return handler, done, kept


async def _commit_start(settings: Settings, group: str, topic: str, metadata: str = "") -> None:
    """The group has a position (as any running pipeline's has): offset 0 committed."""
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(), group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.commit({tp: OffsetAndMetadata(0, metadata)})
    finally:
        await consumer.stop()


async def test_a_closed_gate_starts_nothing_pauses_and_says_why(settings: Settings) -> None:
    source = await create_topic(settings, "gate-in", 1)
    await produce(settings, source, [f"r{i}".encode() for i in range(20)])
    handled: list[bytes] = []

    async def handler(record: Any) -> Sequence[Output]:
        handled.append(record.value)
        return []

    await _commit_start(settings, settings.group("gate"), source)
    gate = Switch()
    engine = _engine(settings, source, "gate", handler, gate)
    async with engine_on(engine):

        async def noted() -> bool:
            found = await committed(settings, settings.group("gate"), source)
            return "~held=test_hold" in found.get(0, (0, ""))[1]

        await eventually(noted)
        assert handled == [] and engine.snapshot().partitions[0].paused
        gate.reason = None

        async def drained() -> bool:
            found = await committed(settings, settings.group("gate"), source)
            return found.get(0, (0, ""))[0] == 20 and "held" not in found[0][1]

        await eventually(drained)
    assert sorted(handled) == sorted(f"r{i}".encode() for i in range(20))


async def test_the_next_owner_counts_what_it_runs_again(settings: Settings) -> None:
    source = await create_topic(settings, "redo-in", 1)
    await produce(settings, source, [f"r{i}".encode() for i in range(10)])
    started = anyio.Event()
    count = 0

    async def stuck(record: Any) -> Sequence[Output]:
        nonlocal count
        count += 1
        if count == 10:
            started.set()
        await anyio.sleep_forever()  # a call that never answers before the owner goes
        return []

    first = _engine(
        dataclasses.replace(
            settings, engine=dataclasses.replace(settings.engine, shutdown_grace_s=0.0)
        ),
        source,
        "redo",
        stuck,
    )
    async with engine_on(first):
        await started.wait()

        async def noted() -> bool:
            found = await committed(settings, settings.group("redo"), source)
            return "~started=10" in found.get(0, (0, ""))[1]

        await eventually(noted)
    assert (await committed(settings, settings.group("redo"), source))[0][0] == 0

    quick, done, _ = _keeping(10)
    second = _engine(settings, source, "redo", quick)
    async with engine_on(second):
        await done.wait()
    assert second.snapshot().records_redelivered == 10


@pytest.mark.parametrize(
    "metadata",
    ["~started=\u00b2~since=\u2460", "~since=99999999999999999999999999~started=-1", "~since="],
)
async def test_notes_any_client_could_forge_never_stop_the_engine(
    settings: Settings, metadata: str
) -> None:
    """Commit metadata is anyone's the group lets commit: "²" passes `str.isdigit` and
    `int` refuses it; a number past 64 bits makes Kafka's requests fail."""
    source = await create_topic(settings, "forged-in", 1)
    await produce(settings, source, [f"r{i}".encode() for i in range(5)])
    await _commit_start(settings, settings.group("forged"), source, metadata)
    handler, done, handled = _keeping(5)
    engine = _engine(settings, source, "forged", handler)
    async with engine_on(engine):
        with anyio.fail_after(60):
            await done.wait()
    assert sorted(handled) == [f"r{i}".encode() for i in range(5)]
    assert engine.snapshot().records_redelivered == 0
