"""What upstream producers do that a worker must take in its stride (a real broker, the
simulator over HTTP, the worker in this process):

- they compress: librdkafka (kcat) writes batches in each of Kafka's codecs, and every
  request in them is answered once;
- they write in transactions and abort some: a request taken back is never called (it
  would be paid for), under the default at-least-once guarantee too;
- they write a decompression bomb: a small compressed batch that inflates past any real
  one is a dead letter, and the worker's memory stays bounded.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition, codec

from stream import topics
from stream.config import Settings
from stream.devtools.simulator import Simulator
from stream.engine import fetch
from stream.engine.clients import check_codecs
from stream.errors import StreamError
from stream.inflate import MAX_INFLATED_BYTES
from stream.stages import Topics
from stream.worker import Worker
from tests.kit import eventually
from tests.kit.kafka import Record, produce, produce_batch, read_all, zstd_batch
from tests.kit.kcat import kcat_produce, needs_kcat
from tests.kit.requests import request, send, terminal
from tests.kit.workers import simulated_settings, worker_on

pytestmark = pytest.mark.anyio

CODECS = ("gzip", "snappy", "lz4", "zstd")
MODEL = "deepseek-v3-0324-syn"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator() as simulator:
        yield simulator


@pytest.fixture
def settings_(env: dict[str, str], sim: Simulator) -> Settings:
    return simulated_settings(env, sim, max_in_flight=50)


@needs_kcat
async def test_requests_in_compressed_batches_are_each_answered_once(
    settings_: Settings, sim: Simulator
) -> None:
    requests = Topics.of(settings_).requests
    async with worker_on(Worker(settings_, ("primary",))):
        for partition, name in enumerate(CODECS):
            await kcat_produce(
                settings_.kafka.bootstrap_servers,
                requests,
                partition,
                [request(f"{name}-{i}", MODEL) for i in range(3)],
                compression=name,
            )
        found = await terminal(settings_, 3 * len(CODECS))
    assert sorted(found) == sorted(f"{name}-{i}" for name in CODECS for i in range(3))
    assert {topic for topic, _, _ in found.values()} == {Topics.of(settings_).results}
    assert sim.stats()["requests"] == 3 * len(CODECS)  # each called once


async def test_requests_of_an_aborted_upstream_transaction_are_never_called(
    settings_: Settings, sim: Simulator
) -> None:
    assert settings_.engine.guarantee == "at-least-once"  # the default reads them too
    await topics.apply(settings_, await topics.plan(settings_))
    producer = AIOKafkaProducer(
        bootstrap_servers=settings_.kafka.bootstrap_servers, transactional_id="upstream-outbox"
    )
    await producer.start()
    try:
        requests = Topics.of(settings_).requests
        for rid, commit in (("taken-back", False), ("kept", True)):
            await producer.begin_transaction()
            await producer.send_and_wait(requests, request(rid, MODEL), partition=0)
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()
    async with worker_on(Worker(settings_, ("primary",))):
        # after the aborted one on the same partition: once it is answered, the worker
        # has read past the other
        await send(settings_, [("after", request("after", MODEL))])
        found = await terminal(settings_, 2)
    assert sorted(found) == ["after", "kept"]
    assert sim.stats()["requests"] == 2


def test_an_install_without_the_codecs_says_so_before_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_codecs()  # this one has them
    monkeypatch.setattr(codec, "has_zstd", lambda: False)
    with pytest.raises(StreamError, match="cannot read zstd-compressed Kafka records.*cramjam"):
        check_codecs()


# One zstd batch whose one record holds argv[1] bytes of zeros and argv[2] empty headers,
# built where its memory goes with the process: ~8 kB on the wire for 256 MB.
_BOMB = """
import sys
from aiokafka.record.default_records import DefaultRecordBatchBuilder
builder = DefaultRecordBatchBuilder(
    magic=2, compression_type=4, is_transactional=0, producer_id=-1, producer_epoch=-1,
    base_sequence=-1, batch_size=2**31 - 1,
)
value, headers = bytes(int(sys.argv[1])), [("", None)] * int(sys.argv[2])
builder.append(0, timestamp=None, key=b"bomb", value=value, headers=headers)
sys.stdout.buffer.write(bytes(builder.build()))
"""


Letters = list[dict[str, Any]]


async def _written(
    settings: Settings, enough: Callable[[Letters, Letters], bool]
) -> tuple[Letters, Letters]:
    """The results and dead letters (parsed), read until `enough(results, dead)`."""
    names = Topics.of(settings)
    found: tuple[Letters, Letters] = ([], [])

    async def check() -> bool:
        nonlocal found
        results = [orjson.loads(r.value) for r in await read_all(settings, names.results)]
        dead = [orjson.loads(r.value) for r in await read_all(settings, names.dead_letter)]
        found = (results, dead)
        return enough(results, dead)

    await eventually(check, timeout_s=60)
    return found


_PEAK = Path("/proc/self/status")  # VmHWM: the peak RSS
_CLEAR_PEAK = Path("/proc/self/clear_refs")  # "5" resets it (Linux 4.0 on)


def _reset_peak_rss() -> float | None:
    """Make the peak RSS count from now; the RSS now, in MB (None: not on this system)."""
    if not (_PEAK.exists() and _CLEAR_PEAK.exists()):
        return None
    _CLEAR_PEAK.write_text("5")
    return _status_mb("VmRSS:")


def _status_mb(field: str) -> float:
    line = next(x for x in _PEAK.read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) / 1024


async def test_a_decompression_bomb_is_a_dead_letter_and_the_worker_lives(
    settings_: Settings, sim: Simulator
) -> None:
    """The broker keeps a compressed batch as it came, and aiokafka inflated it whole: one
    record of 256 MB of zeros in 8 kB took a consumer past 1 GB (a batch at a topic's
    1 MB limit inflates to tens of GB: every worker that took the partition was killed).
    Inflated within its bound, it is a dead letter and the request after it is answered."""
    await topics.apply(settings_, await topics.plan(settings_))
    assert settings_.kafka.max_batch_bytes == MAX_INFLATED_BYTES  # the default
    # 256 MB of zeros; 6 million empty headers in 12 MB (within the bound: ~600 MB as
    # aiokafka's tuples); 300 headers on a plain record (on the wire as they are)
    bombs = [
        (await anyio.run_process([sys.executable, "-c", _BOMB, str(size), str(count)])).stdout
        for size, count in ((16 * MAX_INFLATED_BYTES, 0), (0, 6_000_000))
    ]
    assert all(len(bomb) < 64 * 1024 for bomb in bombs)
    names = Topics.of(settings_)
    before = _reset_peak_rss()  # the peak counts from here
    async with worker_on(Worker(settings_, ("primary",))):
        for bomb in bombs:
            await produce_batch(settings_, TopicPartition(names.requests, 0), bomb)
        headers = [("h", b"")] * 300
        await produce(settings_, names.requests, [Record(b"{}", partition=0, headers=headers)])
        await produce(settings_, names.requests, [Record(request("after", MODEL), partition=0)])
        results, dead = await _written(settings_, lambda r, d: bool(r) and len(d) == 3)
    assert [r["request_id"] for r in results] == ["after"]
    assert [d["reason"] for d in dead] == ["invalid_encoding"] * 3
    errors = [d["error"] for d in dead]
    for said in ("batch of 8,", "carries 6,000,000 headers, over 256", "carries 300 headers"):
        assert len([e for e in errors if said in e]) == 1, (said, errors)
    assert "inflates past" in next(e for e in errors if "batch of 8," in e)
    assert sim.stats()["requests"] == 1
    if before is not None:
        grew = _status_mb("VmHWM:") - before
        # inflated whole: 256 MB at least twice over; within the bound, 16 MiB and the worker
        assert grew < 300, f"peak RSS grew {grew:.0f} MB: a bomb went off"


async def test_a_bomb_of_many_records_is_stepped_over_a_batch_at_a_time(
    env: dict[str, str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that cannot be inflated cannot be read at all: each of its records is a
    dead letter, found a batch at a time. A record at a time (each a fetch round, ~25 ms)
    a batch of 4,000 small records took two minutes or more, and 200,000 hours."""
    settings = simulated_settings({**env, "STREAM_KAFKA_MAX_BATCH_MB": "1"}, sim, max_in_flight=50)
    await topics.apply(settings, await topics.plan(settings))
    names = Topics.of(settings)
    tp = TopicPartition(names.requests, 0)
    monkeypatch.setattr(fetch, "_MAX_RUN", 1_500)  # (10,000) three recoveries, one partial
    count = 4_000
    bomb = zstd_batch([bytes(300)] * count)  # 1.2 MB inflated, past the 1 MiB bound
    async with worker_on(Worker(settings, ("primary",))):
        await produce(settings, names.requests, [Record(request("before", MODEL), partition=0)])
        await produce_batch(settings, tp, bomb)
        await produce(settings, names.requests, [Record(request("after", MODEL), partition=0)])
        results, dead = await _written(settings, lambda r, d: len(r) == 2 and len(d) >= count)
    assert [r["request_id"] for r in results] == ["before", "after"]
    assert {d["reason"] for d in dead} == {"invalid_encoding"}
    assert sorted(d["source"]["offset"] for d in dead) == list(range(1, count + 1))  # each once
    first = next(d["error"] for d in dead if d["source"]["offset"] == 1)
    assert "inflates past 1,048,576 bytes" in first
    later = next(d["error"] for d in dead if d["source"]["offset"] == 2_000)
    assert "@2000 (its batch, @1 to @4000, cannot be read: a zstd batch" in later
