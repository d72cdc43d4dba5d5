"""Authenticated Kafka: SASL/SCRAM with ACLs, in the clear and over TLS, on local brokers
started for this module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import trustme
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from cryptography.hazmat.primitives import serialization

from stream.config import Settings
from stream.devtools.broker import LocalBroker, free_port
from stream.devtools.faults import parse_faults
from stream.devtools.simulator import SimConfig, Simulator
from tests.kit import run_cli
from tests.kit.requests import request
from tests.kit.workers import simulator_env, worker_round_trip

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-scram-password"
WORKER_ACLS = {
    "--topic": ("Describe", "Read", "Write"),
    "--group": ("Describe", "Read"),
    "--transactional-id": ("Describe", "Write"),
}


@pytest.fixture(scope="module")
def scram_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    broker = LocalBroker(
        home=Path(tmp_path_factory.mktemp("scram")),
        port=free_port(),
        scram_users={"stream": PASSWORD, "stranger": "stranger-password", "worker": PASSWORD},
    )
    broker.start()
    acl = "org.apache.kafka.tools.AclCommand"
    # The least a worker needs (README): its topics, groups and transactional ids, by prefix.
    for resource, operations in WORKER_ACLS.items():
        granted = [arg for operation in operations for arg in ("--operation", operation)]
        broker.run_tool(
            acl,
            "--add",
            "--allow-principal",
            "User:worker",
            *granted,
            resource,
            "sec.least.",
            "--resource-pattern-type",
            "prefixed",
        )
    _grant_all(broker, "stream", "sec.")
    try:
        yield broker
    finally:
        broker.stop()


def _grant_all(broker: LocalBroker, user: str, prefix: str) -> None:
    """Every right on the topics, groups and transactional ids under `prefix`."""
    for resource in ("--topic", "--group", "--transactional-id"):
        broker.run_tool(
            "org.apache.kafka.tools.AclCommand",
            "--add",
            "--allow-principal",
            f"User:{user}",
            "--operation",
            "All",
            resource,
            prefix,
            "--resource-pattern-type",
            "prefixed",
        )


def _tls_files(folder: Path, ca: trustme.CA) -> Path:
    """The broker's keystore (PKCS#8 key + chain, as Kafka's PEM store reads it) and, beside
    it, `ca.pem` for clients; returns the keystore."""
    cert = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.RSA)
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    keystore = folder / "server.pem"
    keystore.write_bytes(pkcs8 + b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return keystore


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """SCRAM over TLS (SASL_SSL), one user with all rights under "sec."."""
    folder = Path(tmp_path_factory.mktemp("tls"))
    broker = LocalBroker(
        home=folder / "kafka",
        port=free_port(),
        scram_users={"stream": PASSWORD},
        tls_keystore=_tls_files(folder, trustme.CA(key_type=trustme.KeyType.RSA)),
    )
    broker.home.mkdir()
    broker.start()
    _grant_all(broker, "stream", "sec.")
    try:
        yield broker
    finally:
        broker.stop()


def _env(broker: LocalBroker, base: dict[str, str], user: str, password: str) -> dict[str, str]:
    tls = (
        {
            "STREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "STREAM_KAFKA_SSL_CAFILE": str(broker.tls_keystore.with_name("ca.pem")),
        }
        if broker.tls_keystore
        else {"STREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}
    )
    return {
        **base,
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{broker.sasl_port}",
        "STREAM_TOPIC_PREFIX": "sec.",
        **tls,
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


def _worker_env(
    broker: LocalBroker, base: dict[str, str], sim: Simulator, password: str, prefix: str
) -> dict[str, str]:
    return simulator_env(
        _env(broker, base, "stream", password),
        sim,
        STREAM_TOPIC_PREFIX=prefix,
        STREAM_METRICS_PORT="0",
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_the_worker_runs_end_to_end_over_sasl_scram(
    scram_broker: LocalBroker, env: dict[str, str], tmp_path: Path, guarantee: str
) -> None:
    # Under "sec.": the ACLs (topics, groups, transactional ids) are prefixed grants.
    prefix = f"sec.w{guarantee[:5]}."
    await _run_worker_end_to_end(scram_broker, env, tmp_path, guarantee, prefix, "stream")


@pytest.mark.timeout(180)
async def test_the_worker_runs_end_to_end_over_sasl_ssl(
    tls_broker: LocalBroker, env: dict[str, str], tmp_path: Path
) -> None:
    """TLS to the broker, verified against the CA in STREAM_KAFKA_SSL_CAFILE."""
    await _run_worker_end_to_end(tls_broker, env, tmp_path, "at-least-once", "sec.tls.", "stream")


@pytest.mark.timeout(60)
async def test_a_broker_certificate_the_ca_did_not_sign_is_refused_in_one_line(
    tls_broker: LocalBroker, env: dict[str, str], tmp_path: Path
) -> None:
    other = trustme.CA(key_type=trustme.KeyType.RSA)
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    untrusting = {
        **_env(tls_broker, env, "stream", PASSWORD),
        "STREAM_KAFKA_SSL_CAFILE": str(tmp_path / "other-ca.pem"),
    }
    done = await run_cli(untrusting, "topics", "apply")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "TLS to Kafka" in done.stderr and "STREAM_KAFKA_SSL_CAFILE" in done.stderr
    assert "credentials" not in done.stderr  # the password is fine: the CA is not


@pytest.mark.timeout(180)
async def test_the_worker_needs_only_the_documented_acls(
    scram_broker: LocalBroker, env: dict[str, str], tmp_path: Path
) -> None:
    """User `worker` holds only WORKER_ACLS (no Create, no cluster rights), exactly-once."""
    await _run_worker_end_to_end(
        scram_broker, env, tmp_path, "exactly-once", "sec.least.", "worker"
    )


async def _run_worker_end_to_end(
    broker: LocalBroker,
    env: dict[str, str],
    tmp_path: Path,
    guarantee: str,
    prefix: str,
    user: str,
) -> None:
    scram_broker = broker
    down = parse_faults("hf:moonshotai/Kimi-K2-Thinking=rate:1:503")
    async with Simulator(SimConfig(faults=down)) as sim:
        admin = _worker_env(scram_broker, env, sim, PASSWORD, prefix)
        done = await run_cli(admin, "topics", "apply")  # as `stream`, who may create
        assert done.returncode == 0, done.stderr
        secure = {
            **admin,
            "STREAM_KAFKA_SASL_USERNAME": user,
            "STREAM_GUARANTEE": guarantee,
            "STREAM_SYNTHETIC_MAX_RETRIES": "1",
            "STREAM_LOG_LEVEL": "DEBUG",  # the password must not show even there
        }
        log = tmp_path / "worker.log"
        found, code = await worker_round_trip(
            [sys.executable, "-m", "stream", "run", "all"],
            secure,
            Settings.from_env(secure),
            [
                ("sasl-ok", request("sasl-ok", "deepseek-v3-0324-syn")),
                ("sasl-fb", request("sasl-fb", "kimi-k2-thinking-syn")),
                ("sasl-bad", b"{not json"),
            ],
            log=log,
        )
    output = log.read_text()
    assert code == 0, output[-2000:]
    assert found["sasl-ok"][1]["provider"] == "synthetic"
    assert found["sasl-fb"][1]["provider"] == "together"  # went through the fallback topic
    assert found["sasl-bad"][1]["reason"] == "invalid_json"
    assert "sasl" in output.lower() and PASSWORD not in output


@pytest.mark.timeout(60)
async def test_the_worker_with_a_wrong_password_exits_with_one_line(
    scram_broker: LocalBroker, env: dict[str, str]
) -> None:
    async with Simulator(SimConfig()) as sim:
        wrong = _worker_env(scram_broker, env, sim, "wrong-password", "sec.wrong.")
        done = await run_cli(wrong, "run", "all")
    assert done.returncode == 1
    assert "rejected our credentials" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "wrong-password" not in done.stderr


@pytest.mark.timeout(60)
async def test_the_worker_as_a_user_without_acls_says_so(
    scram_broker: LocalBroker, env: dict[str, str]
) -> None:
    async with Simulator(SimConfig()) as sim:
        stranger = {
            **_worker_env(scram_broker, env, sim, "stranger-password", "sec."),
            "STREAM_KAFKA_SASL_USERNAME": "stranger",
        }
        done = await run_cli(stranger, "run", "all")
    assert done.returncode == 1
    # The topics exist (an earlier test applied them): the user just cannot see them.
    assert "stranger" in done.stderr and "ACL" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# -- the same through --bootstrap-server and --command-config (Kafka tools' properties) -----

SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
PLAIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"


def _client_properties(
    folder: Path, broker: LocalBroker, *, mechanism: str, password: str = PASSWORD
) -> Path:
    """A client.properties as an operator keeps it for kafka-topics.sh, the JAAS line
    continued over two lines."""
    module = PLAIN_MODULE if mechanism == "PLAIN" else SCRAM_MODULE
    lines = [
        "# for kafka-topics.sh --command-config, and now for stream",
        f"security.protocol={'SASL_SSL' if broker.tls_keystore else 'SASL_PLAINTEXT'}",
        f"sasl.mechanism={mechanism}",
        f"sasl.jaas.config={module} required \\",
        f'    username="stream" password="{password}";',
        "client.id=ops-cli",
    ]
    if broker.tls_keystore:
        ca = broker.tls_keystore.with_name("ca.pem")
        lines += ["ssl.truststore.type=PEM", f"ssl.truststore.location={ca}"]
    path = folder / f"client-{mechanism.lower()}.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


def _given(broker: LocalBroker, properties: Path) -> list[str]:
    """The options Kafka's tools take, for this broker's SASL listener."""
    return [
        "--bootstrap-server",
        f"127.0.0.1:{broker.sasl_port}",
        "--command-config",
        str(properties),
    ]


def _misleading_env(base: dict[str, str], prefix: str) -> dict[str, str]:
    """An environment pointing elsewhere with the wrong password: the command line wins."""
    return {
        **base,
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "STREAM_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "STREAM_KAFKA_SASL_PASSWORD": "wrong-password",
        "STREAM_TOPIC_PREFIX": prefix,
    }


@pytest.mark.timeout(180)
async def test_every_kafka_command_takes_the_kafka_tools_options_over_sasl_ssl(
    tls_broker: LocalBroker, env: dict[str, str], tmp_path: Path
) -> None:
    given = _given(tls_broker, _client_properties(tmp_path, tls_broker, mechanism="SCRAM-SHA-512"))
    misleading = _misleading_env(env, "sec.cc.")

    applied = await run_cli(misleading, "topics", "apply", "--json", *given)
    assert applied.returncode == 0, applied.stderr
    assert orjson.loads(applied.stdout)["applied"] == 5
    for command in (
        ["replay", "--since", "1h", "--dry-run", "--json"],
        ["redrive", "--dry-run", "--json"],
    ):
        done = await run_cli(misleading, *command, *given)
        assert done.returncode == 0, (command, done.stderr)
        assert orjson.loads(done.stdout)["outcome"] == "done"
    lag = await run_cli(misleading, "lag", "--json", "--samples", "2", "--interval", "0.1", *given)
    # no worker has run: the pipeline's groups are listed with their (empty) partitions,
    # which only the cluster on the command line can say
    assert lag.returncode == 0, lag.stderr
    rows = orjson.loads(lag.stdout)
    assert rows and {row["status"] for row in rows} == {"OK"}
    assert {row["topic"] for row in rows} >= {"sec.cc.predictions.requests"}

    async with Simulator(SimConfig()) as sim:
        worker_env = simulator_env(misleading, sim, STREAM_METRICS_PORT="0")
        settings = Settings.from_env(
            {**_env(tls_broker, env, "stream", PASSWORD), "STREAM_TOPIC_PREFIX": "sec.cc."}
        )
        found, code = await worker_round_trip(
            [sys.executable, "-m", "stream", "run", "primary", *given],
            worker_env,
            settings,
            [("cc-ok", request("cc-ok", "deepseek-v3-0324-syn"))],
            log=tmp_path / "worker.log",
        )
    assert code == 0, (tmp_path / "worker.log").read_text()[-2000:]
    assert found["cc-ok"][1]["provider"] == "synthetic"


@pytest.mark.timeout(60)
async def test_sasl_plain_from_a_command_config(
    scram_broker: LocalBroker, env: dict[str, str], tmp_path: Path
) -> None:
    misleading = _misleading_env(env, "sec.plain.")
    right = _client_properties(tmp_path, scram_broker, mechanism="PLAIN")
    done = await run_cli(misleading, "topics", "apply", *_given(scram_broker, right))
    assert done.returncode == 0, done.stderr

    wrong = _client_properties(tmp_path, scram_broker, mechanism="PLAIN", password="nope-nope")
    refused = await run_cli(misleading, "topics", "apply", *_given(scram_broker, wrong))
    assert refused.returncode == 1
    assert "rejected our credentials" in refused.stderr and "--command-config" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "nope-nope" not in refused.stderr
