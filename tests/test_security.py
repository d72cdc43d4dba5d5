"""Authenticated Kafka: SASL/SCRAM with ACLs on a local broker started for this module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream.broker import LocalBroker, free_port
from stream.config import Settings
from tests.conftest import run_cli

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-scram-password"


@pytest.fixture(scope="module")
def scram_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    broker = LocalBroker(
        home=Path(tmp_path_factory.mktemp("scram")),
        port=free_port(),
        scram_users={"stream": PASSWORD, "stranger": "stranger-password"},
    )
    broker.start()
    acl = "org.apache.kafka.tools.AclCommand"
    for resource in ("--topic", "--group", "--transactional-id"):
        broker.run_tool(
            acl,
            "--add",
            "--allow-principal",
            "User:stream",
            "--operation",
            "All",
            resource,
            "sec.",
            "--resource-pattern-type",
            "prefixed",
        )
    try:
        yield broker
    finally:
        broker.stop()


def _env(broker: LocalBroker, base: dict[str, str], user: str, password: str) -> dict[str, str]:
    return {
        **base,
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{broker.sasl_port}",
        "STREAM_TOPIC_PREFIX": "sec.",
        "STREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "STREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "STREAM_KAFKA_SASL_USERNAME": user,
        "STREAM_KAFKA_SASL_PASSWORD": password,
    }


async def test_right_credentials_apply_topics_and_round_trip(
    scram_broker: LocalBroker, env: dict[str, str]
) -> None:
    secure = _env(scram_broker, env, "stream", PASSWORD)
    done = await run_cli(secure, "topics", "apply")
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr

    settings = Settings.from_env(secure)
    topic = settings.topic("predictions.requests")
    producer = AIOKafkaProducer(**settings.kafka.client_options(), enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        **settings.kafka.client_options(),
        group_id=settings.group("predictions-primary"),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await consumer.getone()
        assert record.value == b"hello"
    finally:
        await consumer.stop()


@pytest.mark.timeout(60)
async def test_wrong_password_is_a_clear_error_not_a_hang(
    scram_broker: LocalBroker, env: dict[str, str]
) -> None:
    done = await run_cli(_env(scram_broker, env, "stream", "wrong-password"), "topics", "apply")
    assert done.returncode == 1
    assert "rejected our credentials" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "wrong-password" not in done.stderr


@pytest.mark.timeout(60)
async def test_a_user_without_acls_is_told_so(
    scram_broker: LocalBroker, env: dict[str, str]
) -> None:
    done = await run_cli(
        _env(scram_broker, env, "stranger", "stranger-password"), "topics", "apply"
    )
    assert done.returncode == 1
    assert "not allowed" in done.stderr and "kafka-acls" in done.stderr
    assert done.stderr.count("\n") == 1
