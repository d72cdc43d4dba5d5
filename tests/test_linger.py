"""`STREAM_KAFKA_LINGER_MS`: how long the worker's output producers hold a batch open. The
setting, its `linger.ms` spelling in a client properties file, and on a real broker: a lone
output is appended no sooner than the linger after its handler returned (the broker stamps
the append: `LogAppendTime`). Under exactly-once the outputs go out with their
transaction's commit, which no reader sees them before (tests/test_engine.py)."""

from __future__ import annotations

import dataclasses
import time
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from stream.clientconfig import overrides
from stream.config import Settings
from stream.engine.engine import Engine, Output
from stream.errors import ConfigError
from tests.kit import eventually
from tests.kit.kafka import create_topic, produce, read_all
from tests.kit.workers import engine_on

LINGER_MS = 800


def test_the_setting_defaults_to_25_ms_and_refuses_what_it_cannot_mean() -> None:
    assert Settings.from_env({}).kafka.linger_ms == 25
    assert Settings.from_env({"STREAM_KAFKA_LINGER_MS": "0"}).kafka.linger_ms == 0
    for bad in ("-1", "1001", "5ms", "2.5"):
        with pytest.raises(ConfigError, match=r"^STREAM_KAFKA_LINGER_MS must be"):
            Settings.from_env({"STREAM_KAFKA_LINGER_MS": bad})


def test_a_client_properties_file_may_name_the_linger(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.properties", tmp_path / "bad.properties"
    good.write_text("bootstrap.servers=127.0.0.1:9092\nlinger.ms = 40\n")
    bad.write_text("bootstrap.servers=127.0.0.1:9092\nlinger.ms=a while\n")
    assert overrides(Namespace(command_config=str(good)))["STREAM_KAFKA_LINGER_MS"] == "40"
    with pytest.raises(ConfigError, match=r"line 2: linger.ms must be a whole number of ms"):
        overrides(Namespace(command_config=str(bad)))


@pytest.mark.anyio
@pytest.mark.kafka
async def test_a_lone_output_waits_the_linger_for_company(settings: Settings) -> None:
    guarantee = "at-least-once"
    live = dataclasses.replace(
        settings,
        engine=dataclasses.replace(settings.engine, guarantee=guarantee),
        kafka=dataclasses.replace(settings.kafka, linger_ms=LINGER_MS),
    )
    source = await create_topic(live, f"linger-in-{guarantee}", 1)
    sink = await create_topic(
        live, f"linger-out-{guarantee}", 1, {"message.timestamp.type": "LogAppendTime"}
    )
    returned_ms: list[float] = []

    async def handler(record: Any) -> Sequence[Output]:
        returned_ms.append(time.time() * 1000)
        return [Output(sink, record.value, key=record.key)]

    engine = Engine(
        settings=live,
        name=f"linger-{guarantee}",
        group_id=live.group(f"linger-{guarantee}"),
        topics=[source],
        handler=handler,
        on_error=lambda record, exc: [],
        output_topics=[sink],
    )
    async with engine_on(engine):
        await produce(live, source, [b"alone"])

        async def done() -> bool:
            return engine.snapshot().records_done >= 1

        await eventually(done)
    (written,) = await read_all(live, sink, isolation="read_committed")
    assert written.value == b"alone"
    # The broker's clock and ours are this machine's: the append came after the linger.
    assert written.timestamp - returned_ms[0] >= LINGER_MS - 5, (written.timestamp, returned_ms)
