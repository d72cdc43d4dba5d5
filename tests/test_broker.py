"""The pinned broker does what the engine relies on, through aiokafka."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from hypothesis import given
from hypothesis import strategies as st

from stream.config import Settings
from stream.devtools.broker import LocalBroker
from stream.errors import BrokerError, KafkaError
from stream.kafka import admin_client

pytestmark = pytest.mark.anyio


async def _topic(settings: Settings, partitions: int = 1) -> str:
    name = settings.topic(f"roundtrip-{uuid.uuid4().hex[:6]}")
    async with admin_client(settings.kafka, doing="test") as admin:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    return name


async def _read_all(settings: Settings, topic: str, expect: int, isolation: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation,
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        for _ in range(50):
            batch = await consumer.getmany(timeout_ms=200)
            values += [r.value for records in batch.values() for r in records]
            if len(values) >= expect and not batch:
                break
    finally:
        await consumer.stop()
    return values


async def test_idempotent_producer_round_trip(settings: Settings) -> None:
    topic = await _topic(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        for i in range(100):
            await producer.send(topic, f"v{i}".encode(), key=b"k")
        await producer.flush()
    finally:
        await producer.stop()
    assert await _read_all(settings, topic, 100, "read_uncommitted") == [
        f"v{i}".encode() for i in range(100)
    ]


async def test_transactions_commit_outputs_and_offsets_together(settings: Settings) -> None:
    topic = await _topic(settings)
    group = settings.group("tx-group")
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        transactional_id=f"tx-{uuid.uuid4().hex}",
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, b"committed")
            await producer.send_offsets_to_transaction({TopicPartition(topic, 0): 7}, group)
        await producer.begin_transaction()
        await producer.send(topic, b"aborted")
        await producer.abort_transaction()
    finally:
        await producer.stop()

    assert await _read_all(settings, topic, 1, "read_committed") == [b"committed"]
    async with admin_client(settings.kafka, doing="test") as admin:
        offsets = await admin.list_consumer_group_offsets(group)
    assert offsets[TopicPartition(topic, 0)].offset == 7


async def test_unreachable_cluster_is_one_clear_error() -> None:
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    with pytest.raises(KafkaError, match="cannot reach Kafka at 127.0.0.1:1"):
        async with admin_client(settings.kafka, doing="testing"):
            pass


async def test_an_unreachable_local_cluster_gets_the_command_that_starts_it() -> None:
    from stream.devtools.cluster import free_ports

    first = free_ports(3)  # nothing listens there
    servers = ",".join(f"127.0.0.1:{port}" for port in (first + 1, first, first + 2))
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": servers})
    with pytest.raises(KafkaError) as raised:
        async with admin_client(settings.kafka, doing="testing"):
            pass
    assert f"`stream kafka start --brokers 3 --port {first}`" in str(raised.value)


@given(
    st.lists(st.integers(1, 65535), min_size=1, max_size=9),
    st.lists(st.sampled_from(["127.0.0.1", "localhost", "[::1]", "kafka-1", "10.0.0.7"])),
)
def test_the_start_hint_names_the_local_cluster_only_for_loopback_servers(
    ports: list[int], hosts: list[str]
) -> None:
    from stream.kafkaerrors import _start_hint

    named = [f"{hosts[i % len(hosts)] if hosts else '127.0.0.1'}:{p}" for i, p in enumerate(ports)]
    hint = _start_hint(", ".join(named))
    loopback = all(
        server.rpartition(":")[0] in ("127.0.0.1", "localhost", "[::1]") for server in named
    )
    if not loopback:
        assert "stream kafka start" not in hint
    elif len(ports) == 1:  # at its port: `stream kafka start` alone is on 9092
        port = "" if ports[0] == 9092 else f" --port {ports[0]}"
        assert hint == f"start a local one with `stream kafka start{port}`"
    else:
        assert hint.endswith(f"`stream kafka start --brokers {len(ports)} --port {min(ports)}`")


async def test_an_unreachable_broker_gets_the_command_that_starts_it_at_its_port() -> None:
    """`stream kafka start` alone listens on 9092: for a broker on another port the hint
    left --port out, and it said to set KAFKA_BOOTSTRAP_SERVERS when the address came from
    --bootstrap-server (which wins over it)."""
    from stream.devtools.broker import free_port
    from tests.kit import run_cli

    port = free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAM_", "KAFKA_"))}
    done = await run_cli(env, "lag", "--bootstrap-server", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert f"cannot reach Kafka at 127.0.0.1:{port} while" in done.stderr
    assert f"(start a local one with `stream kafka start --port {port}`, or fix" in done.stderr
    assert "the address: --bootstrap-server, else KAFKA_BOOTSTRAP_SERVERS)" in done.stderr
    assert "set KAFKA_BOOTSTRAP_SERVERS" not in done.stderr


def test_missing_java_is_a_clear_error(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="java is not installed"):
        LocalBroker(home=tmp_path, port=1).start()  # type: ignore[arg-type]


def _stand_in(home: Path) -> list[str]:
    """A live process that looks like the node of `home` (its properties file among its
    arguments, as the broker's java command has it)."""
    sleep = "import time; time.sleep(120)"
    return [sys.executable, "-c", sleep, "kafka.Kafka", str(home / "server.properties")]


async def test_kafka_status_json_for_scripts(tmp_path: Path) -> None:
    import json

    from stream.devtools.broker import free_port
    from stream.devtools.jars import KAFKA_VERSION
    from tests.kit import run_cli

    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_")}
    port = free_port()
    where = ["--home", str(tmp_path), "--port", str(port), "--json"]
    down = await run_cli(env, "kafka", "status", *where)
    assert down.returncode == 1
    assert json.loads(down.stdout) == {
        "state": "not running",
        "running": False,
        "version": KAFKA_VERSION,
        "bootstrap_servers": f"127.0.0.1:{port}",
        "pid": None,
        "home": str(tmp_path),
    }
    # status goes by the pid file and whether that process lives and is a Kafka node: a
    # stale file (after a reboot) may name another process, which stop must not kill
    (tmp_path / "broker.pid").write_text(str(os.getpid()))
    stale = await run_cli(env, "kafka", "status", *where)
    assert stale.returncode == 1 and json.loads(stale.stdout)["running"] is False
    stopped = await run_cli(env, "kafka", "stop", *where)
    assert json.loads(stopped.stdout)["state"] == "not running"  # and this test lives on
    elsewhere = await anyio.open_process(_stand_in(tmp_path / "another-home"))
    node = await anyio.open_process(_stand_in(tmp_path))
    try:
        (tmp_path / "broker.pid").write_text(str(elsewhere.pid))  # another home's node
        theirs = await run_cli(env, "kafka", "stop", *where)
        assert json.loads(theirs.stdout)["state"] == "not running"
        assert elsewhere.returncode is None  # not stopped
        (tmp_path / "broker.pid").write_text(str(node.pid))
        up = await run_cli(env, "kafka", "status", *where)
        assert up.returncode == 0
        report = json.loads(up.stdout)
        assert report["running"] is True and report["pid"] == node.pid
        assert report["state"] == "running"
    finally:
        for process in (node, elsewhere):
            process.kill()
            await process.wait()


def test_kafka_start_checks_its_port_and_home(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.kit import ROOT

    file = tmp_path / "a-file"
    file.write_text("")
    cases = [
        (["--port", "99999"], 2, "99999 is not a port: use 1-65535"),
        (["--port", "0"], 2, "0 is not a port"),
        (["--port", "19092", "--home", str(file)], 1, "is a file: give a folder"),
        (["--brokers", "3", "--home", str(file)], 1, "is a file: give a folder"),
    ]
    for args, code, text in cases:
        done = subprocess.run(
            [sys.executable, "-m", "stream", "kafka", "start", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == code, (args, done.stderr)
        assert text in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_start_interrupted_before_the_broker_is_ready_leaves_none_running(
    tmp_path: Path, signum: str
) -> None:
    """Ctrl-C (or SIGTERM, as `timeout` sends) while `stream kafka start` waits: the broker
    it launched is stopped, not left running on its port with a pid file that says "already
    running" next time."""
    import signal
    import subprocess
    import sys
    import time

    from stream.devtools.broker import free_port
    from stream.devtools.processes import running
    from tests.kit import ROOT

    pid_file = tmp_path / "broker.pid"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream",
            "kafka",
            "start",
            "--port",
            str(free_port()),
            "--home",
            str(tmp_path),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not pid_file.exists():  # launched (the JVM needs a few seconds more to be ready)
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    broker = int(pid_file.read_text())
    try:
        process.send_signal(signal.Signals[signum])
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130 and b"Traceback" not in err, err
        assert not running(broker)
        assert not pid_file.exists()
    finally:  # started by this test: not left to run on after it fails
        LocalBroker(home=tmp_path).kill()


async def test_a_cluster_is_refused_in_a_single_brokers_home(
    env: dict[str, str], tmp_path: Path
) -> None:
    """As a single broker is refused in a cluster's home: a cluster started beside it would
    leave it running, out of reach of both `stream kafka stop`s."""
    from stream.devtools.broker import free_port
    from stream.devtools.cluster import LocalCluster, free_ports
    from tests.kit import run_cli

    if "STREAM_CACHE_DIR" in os.environ:  # the broker's jars, fetched once
        env = {**env, "STREAM_CACHE_DIR": os.environ["STREAM_CACHE_DIR"]}
    home = ["--home", str(tmp_path)]
    cluster = ["--brokers", "3", "--port", str(free_ports(6)), *home]
    single = ["--port", str(free_port()), *home]
    try:
        assert (await run_cli(env, "kafka", "start", *single)).returncode == 0
        refused = await run_cli(env, "kafka", "start", *cluster)
        assert refused.returncode == 1
        (line,) = refused.stderr.splitlines()
        assert f"{tmp_path} holds a single broker" in line
        assert f"it runs: stream kafka stop --home {tmp_path}" in line
        assert not (tmp_path / "cluster.json").exists()
        stopped = await run_cli(env, "kafka", "stop", *single)
        assert stopped.stdout.strip() == "Kafka stopped", stopped.stderr
        # stopped, its data is still there: a cluster there is refused still
        again = await run_cli(env, "kafka", "status", *cluster)
        assert (
            again.returncode == 1
            and "holds a single broker (made without --brokers)" in again.stderr
        )
    finally:  # started by this test: not left to run on after it fails
        LocalBroker(home=tmp_path).kill()
        LocalCluster(home=tmp_path, port=int(cluster[3])).kill()


async def test_a_home_whose_broker_runs_on_another_port_is_told_not_acted_on(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`--port` names the broker a command acts on: the home's broker running on another
    port is neither reported at the port asked for nor stopped (nor by `stream demo`, which
    finds no Kafka at its own port and would start the home's broker)."""
    from stream.devtools.broker import free_port
    from stream.devtools.processes import running
    from tests.kit import run_cli

    home = tmp_path / "broker"
    stand_in = await anyio.open_process(_stand_in(home))  # the home's "broker"
    try:
        theirs, asked = free_port(), free_port()
        home.mkdir()
        (home / "broker.pid").write_text(str(stand_in.pid))
        (home / "server.properties").write_text(
            f"listeners=PLAINTEXT://127.0.0.1:{theirs},CONTROLLER://127.0.0.1:1\n"
        )
        for action in ("start", "status", "stop"):
            done = await run_cli(env, "kafka", action, "--home", str(home), "--port", str(asked))
            assert done.returncode == 1, (action, done.stdout, done.stderr)
            assert f"runs on port {theirs}, not {asked}: pass --port {theirs}" in done.stderr
            assert "Traceback" not in done.stderr
        # without --port, status (and stop) act on the port the home's broker runs on
        found = await run_cli(env, "kafka", "status", "--home", str(home))
        assert found.returncode == 0 and f"running at 127.0.0.1:{theirs}" in found.stdout
        demo_env = {
            **env,
            "STREAM_CACHE_DIR": str(tmp_path),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{asked}",
        }
        demo = await run_cli(demo_env, "demo", "--requests", "1")
        assert demo.returncode == 1 and f"runs on port {theirs}" in demo.stderr, demo.stderr
        assert running(stand_in.pid)
    finally:
        stand_in.kill()
        await stand_in.wait()


def test_a_stopped_home_keeps_its_port(tmp_path: Path) -> None:
    """A single broker's home knows its port when nothing runs too: once stopped, status
    and stop said 127.0.0.1:9092, and a start without --port moved the home to 9092."""
    import json
    import subprocess

    from stream.devtools.broker import free_port
    from tests.kit import ROOT

    # `stream` whose fallback port (for a home that forgot its own) is not 9092: a test
    # must never start a broker where someone's runs
    command = (
        "import sys; from stream import cli; from stream.devtools import kafkacli; "
        "kafkacli._DEFAULT_PORT = int(sys.argv[1]); sys.exit(cli.main(sys.argv[2:]))"
    )
    fallback, port = free_port(), free_port()
    bootstrap = f"127.0.0.1:{port}"

    def kafka(*args: str) -> dict[str, object]:
        argv = [str(fallback), "kafka", *args, "--home", str(tmp_path), "--json"]
        done = subprocess.run(
            [sys.executable, "-c", command, *argv], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode in (0, 1), done.stderr
        report: dict[str, object] = json.loads(done.stdout)
        return report

    try:
        assert kafka("start", "--port", str(port))["state"] == "started"
        assert kafka("stop")["bootstrap_servers"] == bootstrap
        status = kafka("status")
        assert (status["state"], status["bootstrap_servers"]) == ("not running", bootstrap)
        again = kafka("start")
        assert (again["state"], again["bootstrap_servers"]) == ("started", bootstrap)
        assert kafka("status")["running"] is True
    finally:  # started by this test: not left to run on after it fails
        LocalBroker(home=tmp_path).kill()


async def test_two_starts_at_once_from_one_home_make_one_broker(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The second waits for the first to launch, then finds it running (it failed on the
    data folder the first was formatting, quoting half a Java stack)."""
    import json

    from stream.devtools.broker import free_port
    from tests.kit import run_cli

    if "STREAM_CACHE_DIR" in os.environ:  # the broker's jars, fetched once
        env = {**env, "STREAM_CACHE_DIR": os.environ["STREAM_CACHE_DIR"]}
    where = ["--port", str(free_port()), "--home", str(tmp_path), "--json"]
    states: list[str] = []

    async def start() -> None:
        done = await run_cli(env, "kafka", "start", *where)
        assert done.returncode == 0, done.stderr
        states.append(json.loads(done.stdout)["state"])

    try:
        async with anyio.create_task_group() as both:
            both.start_soon(start)
            both.start_soon(start)
        assert sorted(states) == ["already running", "started"]
    finally:
        LocalBroker(home=tmp_path).stop()


async def test_stop_and_status_of_a_cluster_home_go_by_how_it_was_started(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The home knows its layout: `status --home H` of a cluster's home reads it (it said
    "pass --brokers as when it was started", and then which --port, knowing both)."""
    import json

    from stream.devtools.cluster import free_ports
    from tests.kit import run_cli

    port = free_ports(6)
    (tmp_path / "cluster.json").write_text(json.dumps({"brokers": 3, "port": port}))
    status = await run_cli(env, "kafka", "status", "--home", str(tmp_path), "--json")
    nodes = json.loads(status.stdout)["nodes"]
    assert status.returncode == 1 and len(nodes) == 6  # nothing runs: 3 brokers, 3 controllers
    assert [n["port"] for n in nodes] == list(range(port, port + 6))
    single = await run_cli(env, "kafka", "status", "--home", str(tmp_path), "--brokers", "1")
    assert single.returncode == 1
    assert f"pass --brokers as when it was started (--brokers 3 --port {port})" in single.stderr


_STAND_IN_MVN = """#!/bin/sh
# Maven's stand-in: counts its runs, takes a while, leaves one jar in -DoutputDirectory.
echo run >> "$MVN_RUNS"
sleep 1
for arg in "$@"; do
  case "$arg" in -DoutputDirectory=*) out="${arg#-DoutputDirectory=}" ;; esac
done
mkdir -p "$out" && echo jar > "$out/kafka.jar"
"""


def test_processes_that_need_the_jars_at_once_fetch_them_once(tmp_path: Path) -> None:
    """Test workers start their brokers together on a fresh machine: one fetch runs, the
    others wait for it and take its jars (each replacing the folder under the others'
    brokers could remove the jars a starting broker reads)."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mvn").write_text(_STAND_IN_MVN)
    (bin_dir / "mvn").chmod(0o755)
    runs = tmp_path / "runs"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STREAM_CACHE_DIR": str(tmp_path / "cache"),
        "MVN_RUNS": str(runs),
    }
    fetch = "from stream.devtools.jars import fetch_jars; print(fetch_jars(quiet=True))"
    fetchers = [
        subprocess.Popen([sys.executable, "-c", fetch], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    folders = {fetcher.communicate(timeout=60)[0].strip() for fetcher in fetchers}
    assert all(fetcher.returncode == 0 for fetcher in fetchers)
    assert runs.read_text().splitlines() == ["run"]
    (folder,) = folders
    assert sorted(p.name for p in Path(folder).iterdir()) == [".complete", "kafka.jar"]
    assert not list(Path(folder).parent.glob("*.tmp"))


# Like the JVM, it handles SIGTERM (a shutdown of its own): a paused process without a
# handler dies of a SIGTERM at once (Linux delivers a fatal default action to it).
_SHUTS_DOWN_ON_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("ours", [True, False], ids=["child", "pid"])
def test_stopping_a_paused_process_lets_it_shut_down_rather_than_kill_it(ours: bool) -> None:
    """A broker paused with SIGSTOP (Ctrl-Z, a debugger) receives SIGTERM only once it runs
    again: `kafka stop` sent it and waited its whole grace for nothing, then SIGKILLed it
    (an unclean shutdown: log recovery at the next start)."""
    import subprocess
    import sys
    import time

    from stream.devtools.processes import end, end_pid, running

    child = subprocess.Popen([sys.executable, "-c", _SHUTS_DOWN_ON_SIGTERM], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        child.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        if ours:
            assert end(child, grace_s=20) == 0  # its own shutdown, not -SIGKILL
        else:
            assert end_pid(child.pid, grace_s=20)
            assert child.wait(5) == 0
        assert time.monotonic() - started < 10  # not the whole grace
        assert not running(child.pid)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
