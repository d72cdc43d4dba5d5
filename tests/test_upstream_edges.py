"""What upstream producers do that a worker must take in its stride (a real broker, the
simulator over HTTP, the worker in this process):

- they compress: librdkafka (kcat) writes batches in each of Kafka's codecs, and every
  request in them is answered once;
- they write in transactions and abort some: a request taken back is never called (it
  would be paid for), under the default at-least-once guarantee too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer, codec

from stream import topics
from stream.config import Settings
from stream.devtools.simulator import Simulator
from stream.engine.clients import check_codecs
from stream.errors import StreamError
from stream.stages import Topics
from stream.worker import Worker
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
