"""Each misconfiguration an operator can make is one line on stderr and exit 1: what is
wrong and what to do, never a traceback (`stream` run as a person would run it)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream import topics
from stream.config import Settings
from tests.kit import run_cli

pytestmark = pytest.mark.anyio


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "latin1.toml").write_bytes(b'STREAM_TOPIC_PREFIX = "caf\xe9"\n')
    (tmp_path / "key").write_bytes(b"\xff\xfesk-key\n")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "deep.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000)
    (tmp_path / "typo.toml").write_text('STREAM_GUARANTE = "exactly-once"\n')
    (tmp_path / "table.toml").write_text("[kafka]\nbootstrap = 'x:1'\n")
    (tmp_path / "not-a-ca.pem").write_text("not a certificate\n")
    (tmp_path / "inf.json").write_text(
        '{"models": {"m": {"provider": "synthetic", "api_model": "m", "timeout_s": Infinity}}}'
    )
    return tmp_path


def _one_line(stderr: str, *phrases: str) -> None:
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr[-1500:]
    assert stderr.startswith("stream: error: ")
    for phrase in phrases:
        assert phrase in stderr, stderr


CASES: list[tuple[dict[str, str], list[str], list[str]]] = [
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:b:c"}, ["lag"], ["'a:b:c' is not host:port"]),
    ({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:99999"}, ["lag"], ["between 1 and 65535"]),
    ({"KAFKA_BOOTSTRAP_SERVERS": "h:9092,"}, ["lag"], ["'' is not host:port"]),
    (
        {"STREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "STREAM_KAFKA_SSL_CAFILE": "/missing/ca.pem"},
        ["lag"],
        ["STREAM_KAFKA_SSL_CAFILE", "not a readable file"],
    ),
    (
        {"STREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "STREAM_KAFKA_SSL_CAFILE": "{}/not-a-ca.pem"},
        ["lag"],
        ["TLS files cannot be loaded", "STREAM_KAFKA_SSL_CAFILE"],
    ),
    ({"STREAM_CONFIG_FILE": "{}/latin1.toml"}, ["lag"], ["latin1.toml", "not UTF-8"]),
    ({"SYNTHETIC_API_KEY_FILE": "{}/key"}, ["lag"], ["SYNTHETIC_API_KEY_FILE", "not UTF-8"]),
    ({"STREAM_CATALOG_FILE": "{}/key"}, ["run", "primary"], ["catalog", "not UTF-8"]),
    ({"STREAM_CATALOG_FILE": "{}/deep.json"}, ["run", "primary"], ["nested too deep"]),
    ({"STREAM_CATALOG_FILE": "{}/deep.toml"}, ["run", "primary"], ["nested too deep"]),
    ({"STREAM_CATALOG_FILE": "{}/inf.json"}, ["run", "primary"], ["timeout_s", "finite"]),
    ({"STREAM_COMMIT_INTERVAL_S": "inf"}, ["lag"], ["STREAM_COMMIT_INTERVAL_S", "finite"]),
    (
        {"KAFKA_BOOTSTRAP_SERVERS": "no-such-host.invalid:9092"},
        ["lag"],
        ["no address for no-such-host.invalid (DNS)", "KAFKA_BOOTSTRAP_SERVERS"],
    ),
    (
        {"STREAM_REBALANCE_TIMEOUT_MS": "9" * 23},  # Kafka's 32 bits: its join would fail
        ["lag"],
        ["STREAM_REBALANCE_TIMEOUT_MS must be between 1 and 2147483647"],
    ),
    ({"STREAM_SHUTDOWN_GRACE_S": "Infinity"}, ["lag"], ["STREAM_SHUTDOWN_GRACE_S", "finite"]),
    ({"STREAM_SYNTHETIC_TIMEOUT_S": "inf"}, ["lag"], ["STREAM_SYNTHETIC_TIMEOUT_S", "finite"]),
    ({"STREAM_TOPIC_PREFIX": "team a/"}, ["topics", "apply"], ["STREAM_TOPIC_PREFIX", "' '"]),
    ({"STREAM_TOPIC_PREFIX": "p" * 240}, ["topics", "apply"], ["over Kafka's 249"]),
    (
        {"STREAM_CONFIG_FILE": "{}/typo.toml"},
        ["lag"],
        ["STREAM_GUARANTE is not a setting", "did you mean STREAM_GUARANTEE?"],
    ),
    ({"STREAM_CONFIG_FILE": "{}/table.toml"}, ["lag"], ["kafka must be a string, number"]),
    ({"STREAM_METRICS_HOST": "no-such-host.invalid"}, ["run", "primary"], ["not an address"]),
]


# Values the command line gives that the command cannot take: exit 2, as argparse's own.
USAGE = [
    (["demo", "--requests", "-1"], "--requests must be at least 1"),
    (["demo", "--rate", "inf"], "--rate"),
    (["simulate", "--port", "99999"], "--port 99999 is not a port"),
    (["replay", "--since", "1h", "--rate", "0"], "--rate must be between"),
    (["replay", "--since", "1h", "--limit", "-1"], "--limit must be at least 1"),
    (["replay", "--since", "soon"], "--since"),
    (["redrive", "--max-attempts", "0"], "--max-attempts must be at least 1"),
    (["topics", "apply", "--retry-for", "-1"], "--retry-for"),
    (["lag", "--stall-after", "5 min"], "--stall-after: '5 min' is not a duration"),
    # checked as the same value from the environment is, and a usage error all the same
    (["lag", "--bootstrap-server", "localhost"], "--bootstrap-server"),
    (["run", "primary", "--instance-id", "bad id"], "--instance-id"),
    (["run", "primary", "--instance-id", ""], "--instance-id needs an id"),
    (["bench", "--requests", "0"], "--requests, --concurrency"),
    (["bench", "--scenario", "scale-out", "--workers", "0"], "--workers"),
    (["simulate", "--latency", "-1"], "latency"),
    (["simulate", "--faults", "garbage"], "garbage"),
    (["simulate", "--rate-window", "0"], "--rate-window"),
    (["simulate", "--rate-limit", "0"], "--rate-limit"),
]


@pytest.mark.parametrize(("args", "phrase"), USAGE)
async def test_a_value_the_command_cannot_take_is_a_usage_error(
    env: dict[str, str], args: list[str], phrase: str
) -> None:
    done = await run_cli(env, *args)
    assert done.returncode == 2, done.stderr[-1500:]
    *_, last = done.stderr.strip().splitlines()  # after argparse's usage lines, if any
    assert last.startswith(f"stream {args[0]}: error: ") and phrase in last, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("extra", "args", "phrases"), CASES)
async def test_a_misconfiguration_is_one_line_and_exit_1(
    env: dict[str, str],
    settings: Settings,
    files: Path,
    extra: dict[str, str],
    args: list[str],
    phrases: list[str],
) -> None:
    if "STREAM_METRICS_HOST" in extra:  # it must get as far as its HTTP server
        await topics.apply(settings, await topics.plan(settings))
    done = await run_cli(
        {**env, **{k: v.replace("{}", str(files)) for k, v in extra.items()}}, *args
    )
    assert done.returncode == 1, done.stderr[-1500:]
    _one_line(done.stderr, *phrases)


async def test_a_metrics_port_in_use_says_which_setting_to_change(
    env: dict[str, str], settings: Settings, taken_port: int
) -> None:
    await topics.apply(settings, await topics.plan(settings))
    done = await run_cli({**env, "STREAM_METRICS_PORT": str(taken_port)}, "run", "primary")
    assert done.returncode == 1
    _one_line(done.stderr, f"port {taken_port} is in use", "STREAM_METRICS_PORT", "0 picks one")


async def test_the_simulator_on_a_taken_port_is_one_line(
    env: dict[str, str], taken_port: int
) -> None:
    done = await run_cli(env, "simulate", "--port", str(taken_port), "--host", "0.0.0.0")
    assert done.returncode == 1
    _one_line(done.stderr, f"port {taken_port} is in use", "--port")


async def test_a_worker_without_its_topics_names_them_and_says_how_to_create_them(
    env: dict[str, str], settings: Settings
) -> None:
    # The test's prefix has no topics: the worker waits a few seconds for a cluster that
    # has not shown them yet, then stops with one line naming every missing topic.
    done = await run_cli(env, "run", "primary")
    assert done.returncode == 1
    requests = f"{settings.topic_prefix}predictions.requests"
    _one_line(done.stderr, "topics missing", requests, "stream topics apply")


async def test_a_bad_worker_setting_does_not_stop_the_local_broker_commands(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`stream kafka` and `stream simulate` read no setting: an operator can still stop
    the local broker while STREAM_MAX_IN_FLIGHT is being fixed."""
    bad = {**env, "STREAM_MAX_IN_FLIGHT": "abc"}
    status = await run_cli(bad, "kafka", "status", "--home", str(tmp_path), "--port", "19091")
    assert status.returncode == 1 and "Kafka is not running" in status.stdout, status.stderr
    # and the command that starts it, with the same place
    assert f"`stream kafka start --port 19091 --home {tmp_path}` starts it" in status.stdout
    assert "STREAM_MAX_IN_FLIGHT" not in status.stderr
    worker = await run_cli(bad, "lag")
    assert worker.returncode == 1 and "STREAM_MAX_IN_FLIGHT" in worker.stderr


async def test_a_session_timeout_kafka_refuses_names_the_setting(
    env: dict[str, str], settings: Settings
) -> None:
    """Kafka checks it only when the consumer joins: the worker's start-up lines come first,
    then one error line that names the setting and the brokers' range."""
    await topics.apply(settings, await topics.plan(settings))
    extra = {"STREAM_SESSION_TIMEOUT_MS": "1000", "SYNTHETIC_API_KEY": "k"}
    done = await run_cli({**env, **extra}, "run", "primary")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-1500:]
    *_, last = done.stderr.strip().splitlines()
    assert last.startswith("stream: error: ") and "STREAM_SESSION_TIMEOUT_MS within" in last
    assert "group.min.session.timeout.ms" in last


@pytest.mark.parametrize("command", [["--help"], ["kafka", "status", "--home", "{home}"]])
def test_a_reader_gone_is_no_traceback(command: list[str], tmp_path: Path) -> None:
    """`stream kafka status | head -1`: the reader goes, and the command stops as a tool
    SIGPIPE kills does (exit 141), not with a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    from tests.kit import ROOT

    (tmp_path / "cluster.json").write_text('{"brokers": 3, "port": 41990}')  # lines to print
    argv = [part.replace("{home}", str(tmp_path)) for part in command]
    read, write = os.pipe()
    os.close(read)  # gone before the first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "stream", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr.decode() and "BrokenPipe" not in done.stderr.decode()
    assert done.returncode == (0 if argv == ["--help"] else 141)  # (help ends before it)


@pytest.mark.parametrize(
    ("command", "named"),
    [("topics", "{apply}"), ("kafka", "{start,stop,status}"), ("run", "{primary,fallback,all}")],
)
def test_a_missing_action_is_named_as_the_usage_shows_it(command: str, named: str) -> None:
    """The usage line shows the choices; the error named an `action` or `stage` it never
    showed."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "stream", command], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    usage = done.stderr.split(f"stream {command}: error:")[0]
    assert named in usage
    assert done.stderr.splitlines()[-1] == (
        f"stream {command}: error: the following arguments are required: {named}"
    )


# Ctrl-C while `stream.config` loads: the point in a command's first ~0.3 s where the
# interrupt lands most often (pydantic). An import hook stands in for the keyboard.
_INTERRUPTED_IMPORT = """
import sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "stream.config":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
from stream.cli import main

sys.exit(main(["lag"]))
"""


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """`code` run by this interpreter from the project's root, its output as text, with
    Ctrl-C as a terminal gives it: a suite started with SIGINT ignored (a background job of
    a non-interactive shell) passes that on, and Python leaves it ignored in the child
    until the command's run takes it."""
    from tests.kit import ROOT

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_ctrl_c_while_the_command_loads_is_an_interruption_not_a_traceback() -> None:
    """The package and the CLI load nothing heavy before `main` runs: what a command needs
    is imported inside its handler of Ctrl-C (exit 130 with its line)."""
    done = _python(_INTERRUPTED_IMPORT)
    assert "Traceback" not in done.stderr, done.stderr
    assert (done.returncode, done.stderr) == (130, "stream: interrupted\n")


# Ctrl-C while `stream.config` loads, as a real SIGINT: the hook sends it, then goes on
# importing. What a command needs loads whole first, and the interrupt comes after.
_SIGNAL_DURING_IMPORT = """
import atexit, os, signal, sys, time

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "stream.config":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # an unheld signal interrupts this, and the import with it
        return None

atexit.register(lambda: print("loaded" if "stream.config" in sys.modules else "cut short"))
sys.meta_path.insert(0, Interrupt())
from stream.cli import main

sys.exit(main(["lag"]))
"""


def test_ctrl_c_while_the_command_loads_waits_until_it_has_loaded() -> None:
    """A signal in the middle of loading a native module (orjson) crashed the interpreter
    (exit -11, in a quarter of the tries 0.09-0.14 s after launch): SIGINT and SIGTERM are
    held while the command loads, then interrupt it as usual."""
    done = _python(_SIGNAL_DURING_IMPORT)
    assert (done.returncode, done.stderr, done.stdout) == (
        130,
        "stream: interrupted\n",
        "loaded\n",
    )
