"""Compressed outputs (`STREAM_KAFKA_COMPRESSION`): the setting, its `compression.type`
spelling in a client properties file, and on a real broker the engine's outputs written
in the codec asked for, under each guarantee: read back unchanged, and smaller on the
broker's disk, as Kafka's own tool (kafka-log-dirs) reports it."""

from __future__ import annotations

import dataclasses
import json
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from stream.clientconfig import overrides
from stream.config import Settings
from stream.devtools.jars import fetch_jars
from stream.engine.engine import Engine, Output
from stream.errors import ConfigError
from tests.kit import eventually
from tests.kit.kafka import create_topic, produce, read_all
from tests.kit.workers import engine_on

RECORDS = 40


def test_the_setting_takes_kafkas_codec_names_in_any_case() -> None:
    assert Settings.from_env({}).kafka.compression == "none"
    assert Settings.from_env({"STREAM_KAFKA_COMPRESSION": "LZ4"}).kafka.compression == "lz4"
    options = Settings.from_env({"STREAM_KAFKA_COMPRESSION": "zstd"}).kafka.producer_options()
    assert options["compression_type"] == "zstd"
    assert Settings.from_env({}).kafka.producer_options()["compression_type"] is None
    with pytest.raises(ConfigError, match=r"STREAM_KAFKA_COMPRESSION must be one of none, gzip"):
        Settings.from_env({"STREAM_KAFKA_COMPRESSION": "brotli"})


def test_a_client_properties_file_may_name_the_codec(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.properties", tmp_path / "bad.properties"
    good.write_text("bootstrap.servers=127.0.0.1:9092\ncompression.type=Zstd\n")
    bad.write_text("bootstrap.servers=127.0.0.1:9092\ncompression.type=brotli\n")
    assert overrides(Namespace(command_config=str(good)))["STREAM_KAFKA_COMPRESSION"] == "zstd"
    with pytest.raises(ConfigError, match=r"line 2: compression.type must be one of"):
        overrides(Namespace(command_config=str(bad)))


def _value(i: int) -> bytes:
    """An answer-like record: JSON around text that repeats, as answers' words do."""
    text = " ".join(f"step {j % 7}: the model thinks about part {j % 5}." for j in range(60))
    return orjson.dumps({"request_id": f"r-{i}", "content": text, "usage": {"n": i}})


async def _copy(settings: Settings, source: str, sink: str, name: str) -> None:
    """An engine copying `source` to `sink` until all RECORDS are written."""

    async def handler(record: Any) -> Sequence[Output]:
        return [Output(sink, record.value, key=record.key)]

    engine = Engine(
        settings=settings,
        name=name,
        group_id=settings.group(name),
        topics=[source],
        handler=handler,
        on_error=lambda record, exc: [],
        output_topics=[sink],
    )
    async with engine_on(engine):

        async def done() -> bool:
            return engine.snapshot().records_done >= RECORDS

        await eventually(done)


async def _sizes(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Bytes each topic holds on the brokers (every replica), from kafka-log-dirs."""
    tool = await anyio.run_process(
        [
            "java",
            "-Xmx256m",
            "-cp",
            f"{fetch_jars(quiet=True)}/*",
            "org.apache.kafka.tools.LogDirsCommand",
            "--bootstrap-server",
            settings.kafka.bootstrap_servers,
            "--describe",
            "--topic-list",
            ",".join(topics),
        ],
        check=True,
    )
    report = json.loads(tool.stdout.decode().strip().splitlines()[-1])
    sizes = dict.fromkeys(topics, 0)
    for broker in report["brokers"]:
        for folder in broker["logDirs"]:
            for partition in folder["partitions"]:
                topic = partition["partition"].rsplit("-", 1)[0]
                sizes[topic] += partition["size"]
    return sizes


@pytest.mark.anyio
@pytest.mark.kafka
@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_outputs_are_written_in_the_codec_asked_for(
    settings: Settings, guarantee: str
) -> None:
    base = dataclasses.replace(
        settings, engine=dataclasses.replace(settings.engine, guarantee=guarantee)
    )
    source = await create_topic(base, "zip-in", 1)
    await produce(base, source, [_value(i) for i in range(RECORDS)])
    written = {}
    for codec in ("none", "zstd"):
        live = dataclasses.replace(base, kafka=dataclasses.replace(base.kafka, compression=codec))
        written[codec] = await create_topic(live, f"zip-out-{codec}", 1)
        await _copy(live, source, written[codec], f"zip-{codec}")
        copied = await read_all(live, written[codec], isolation="read_committed")
        assert sorted(r.value for r in copied) == sorted(_value(i) for i in range(RECORDS))
    sizes = await _sizes(base, list(written.values()))
    plain, packed = sizes[written["none"]], sizes[written["zstd"]]
    assert plain > RECORDS * len(_value(0))  # all there, uncompressed
    assert packed < plain / 4, sizes
