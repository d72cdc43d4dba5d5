"""Size limits, end to end: the biggest record the requests topic accepts becomes a dead
letter that carries all of its bytes, and the partition goes on.

The limits, chosen together: the requests topic takes records up to 1,048,588 bytes
(`max.message.bytes`, Kafka's default); requests over STREAM_MAX_REQUEST_BYTES (256 KiB by
default) are dead letters (`too_large`) carrying their bytes base64-encoded, up to about
1.4 MiB, which the dead-letter topic (2 MiB) and the engine's producer
(`max_request_size`, 2 MiB) both take. Bigger ones (a compressed batch lets them in) go
without their bytes, and say so.
"""

from __future__ import annotations

import base64

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from hypothesis import given
from hypothesis import strategies as st

from stream import topics
from stream.devtools.simulator import Simulator
from stream.kafka import admin_client
from stream.worker import Worker
from tests.kit import eventually
from tests.kit.requests import request, terminal
from tests.kit.workers import BOTH, simulated_settings, worker_on

pytestmark = pytest.mark.anyio

TOPIC_MAX = 1_048_588  # topics/requests.toml max.message.bytes
BATCH_OVERHEAD = 100  # record batch header and record framing: the value gets the rest


async def test_a_record_at_the_topic_maximum_becomes_a_dead_letter_with_all_its_bytes(
    env: dict[str, str],
) -> None:
    filler = "x" * (TOPIC_MAX - BATCH_OVERHEAD - 200)
    huge = request("huge", "deepseek-v3-0324-syn", filler)
    huge += b" " * (TOPIC_MAX - BATCH_OVERHEAD - len(huge))  # JSON allows trailing spaces
    async with Simulator() as sim:
        live = simulated_settings(env, sim, max_in_flight=8)
        async with worker_on(Worker(live, BOTH)):
            producer = AIOKafkaProducer(
                **live.kafka.client_options(), acks="all", max_request_size=2 * TOPIC_MAX
            )
            await producer.start()
            try:
                topic = live.topic("predictions.requests")
                for rid, value in (
                    ("huge", huge),
                    ("after", request("after", "deepseek-v3-0324-syn")),
                ):
                    # One partition: the good request behind the huge one must not be stuck.
                    await producer.send_and_wait(
                        topic, value, partition=0, headers=[("request-id", rid.encode())]
                    )
            finally:
                await producer.stop()
            found = await terminal(live, 2)
    letter = found["huge"][1]
    assert letter["reason"] == "too_large"
    assert base64.b64decode(letter["raw"]) == huge
    assert len(orjson.dumps(letter)) > 1024 * 1024  # bigger than aiokafka's default limit
    assert found["after"][1]["provider"] == "synthetic"


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_a_compressed_record_too_large_to_carry_is_a_dead_letter_that_names_it(
    env: dict[str, str], guarantee: str
) -> None:
    """The broker judges a compressed batch by its compressed size: a 2 MB value (or a
    3 MB key) arrives in a batch of a few KB. Its dead letter cannot carry it (base64, or
    the key on every output): it goes without it, saying what it left out, instead of a
    record Kafka refuses on every try (the worker stopped, and stopped again at each
    restart: the group was stuck for good)."""
    big = request("big", "deepseek-v3-0324-syn", "y" * 2_000_000)
    async with Simulator() as sim:
        live = simulated_settings({**env, "STREAM_GUARANTEE": guarantee}, sim, max_in_flight=8)
        async with worker_on(Worker(live, BOTH)):  # a worker that stops raises here
            producer = AIOKafkaProducer(
                **live.kafka.client_options(),
                acks="all",
                compression_type="gzip",
                max_request_size=8_000_000,  # its own check is of the uncompressed size
            )
            await producer.start()
            try:
                topic = live.topic("predictions.requests")
                for rid, key, value in (
                    ("big", None, big),
                    ("bigkey", b"k" * 3_000_000, request("bigkey", "deepseek-v3-0324-syn")),
                    ("after", None, request("after", "deepseek-v3-0324-syn")),
                ):
                    await producer.send_and_wait(
                        topic, value, key=key, partition=0, headers=[("request-id", rid.encode())]
                    )
            finally:
                await producer.stop()
            found = await terminal(live, 3)
    for rid, value_bytes, key_bytes in (("big", len(big), 0), ("bigkey", None, 3_000_000)):
        topic_name, letter, _ = found[rid]
        assert topic_name == live.topic("predictions.dead-letter")
        assert letter["reason"] == "too_large" and letter["request_id"] == rid
        assert letter["raw"] is None and letter["request"] is None
        assert letter["omitted"]["key_bytes"] == key_bytes
        if value_bytes is not None:
            assert letter["omitted"]["value_bytes"] == value_bytes
        assert letter["source"]["offset"] >= 0
    assert found["after"][0] == live.topic("predictions.results")


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_an_answer_too_large_for_the_results_topic_is_a_dead_letter_not_a_stall(
    env: dict[str, str], guarantee: str
) -> None:
    """A 1.5 MiB answer cannot go to the 1 MiB results topic: the broker would refuse it on
    every try. It is a dead letter that keeps the request, and the partition goes on."""
    async with Simulator() as sim:
        live = simulated_settings({**env, "STREAM_GUARANTEE": guarantee}, sim, max_in_flight=8)
        async with worker_on(Worker(live, BOTH)):
            producer = AIOKafkaProducer(**live.kafka.client_options(), acks="all")
            await producer.start()
            try:
                topic = live.topic("predictions.requests")
                for rid, text in (("long", "Think hard. [[sim:huge]]"), ("after", "Hi.")):
                    value = request(rid, "deepseek-v3-0324-syn", text)
                    await producer.send_and_wait(topic, value, partition=0)
            finally:
                await producer.stop()
            found = await terminal(live, 2)
    topic_name, letter, _ = found["long"]
    assert topic_name == live.topic("predictions.dead-letter")
    assert letter["reason"] == "result_too_large"
    assert letter["request"]["request_id"] == "long"
    assert "max.message.bytes" in letter["error"]
    [paid] = letter["failures"]  # the answer was paid for: the dead letter says so
    assert paid["error_type"] == "result_too_large" and paid["status"] == 200
    assert paid["cost_usd"] > 0 and paid["provider_request_id"].startswith("chatcmpl-")
    assert found["after"][0] == live.topic("predictions.results")


async def test_a_results_topic_smaller_on_the_cluster_than_declared_is_respected(
    env: dict[str, str],
) -> None:
    """Drift: the cluster's results topic takes less than topics/ declares. The worker reads
    the cluster's value at start, so an answer over it is a dead letter, not a refused
    produce (stalled at-least-once, crashing exactly-once)."""
    async with Simulator() as sim:
        live = simulated_settings(env, sim, max_in_flight=8)
        await topics.apply(live, await topics.plan(live))
        results = live.topic("predictions.results")
        async with admin_client(live.kafka, doing="altering a test topic") as admin:
            resource = ConfigResource(
                ConfigResourceType.TOPIC, results, configs={"max.message.bytes": "600"}
            )
            await admin.alter_configs([resource])

            async def altered() -> bool:
                return (await topics.max_message_bytes(admin, [results])).get(results) == 600

            await eventually(altered)
        worker = Worker(live, BOTH)  # not worker_on: applying the topics would undo the drift
        async with anyio.create_task_group() as group:
            group.start_soon(worker.run)
            await worker.started.wait()
            producer = AIOKafkaProducer(**live.kafka.client_options(), acks="all")
            await producer.start()
            try:
                value = request("drift", "deepseek-v3-0324-syn")
                await producer.send_and_wait(live.topic("predictions.requests"), value)
            finally:
                await producer.stop()
            found = await terminal(live, 1)
            worker.stop()
    topic_name, letter, _ = found["drift"]
    assert topic_name == live.topic("predictions.dead-letter")
    assert letter["reason"] == "result_too_large" and "88 bytes" in letter["error"]


@given(st.integers(0, 5000), st.integers(0, 3000), st.integers(0, 10_000))
def test_a_dead_letter_is_judged_too_large_exactly_when_the_base64_would_be(
    value_bytes: int, key_bytes: int, limit: int
) -> None:
    """Judged before the dead letter is built (no copies of a huge value): the base64 of
    the value and the key, against the limit, as building it would find."""
    from types import SimpleNamespace

    from stream.outlimits import inputs_fit

    record = SimpleNamespace(value=b"\xff" * value_bytes, key=b"k" * key_bytes)
    encoded = len(base64.b64encode(record.value)) + key_bytes
    assert inputs_fit(record, limit=limit) is (encoded <= limit)
