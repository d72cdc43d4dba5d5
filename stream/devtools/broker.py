"""A real single-node Apache Kafka broker (KRaft) for development, tests and the demo.

No Docker engine and no OS package is assumed: the broker jars pinned in
`stream/data/kafka-pom.xml` are fetched from Maven Central with Maven once
(`stream.devtools.jars`), and run with the local Java.
A cluster's nodes (`stream.devtools.cluster`) are `LocalBroker`s with their own properties;
the `stream kafka` command is `stream.devtools.kafkacli`.
"""

from __future__ import annotations

import base64
import fcntl
import re
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from stream.devtools.jars import fetch_jars, require
from stream.devtools.processes import end, end_pid, parent_death_signal, runs
from stream.errors import BrokerError

__all__ = [
    "LocalBroker",
    "brokers_listed",
    "free_port",
    "new_cluster_id",
    "port_open",
]

_SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
_PLAIN_LOGIN = "org.apache.kafka.common.security.plain.PlainLoginModule required"
_LOG4J = """\
status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
"""


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes in URL-safe base64."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # one starting with '-' would be read as an option by the formatter (1 time in 64)
        if not cluster_id.startswith("-"):
            return cluster_id


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class LocalBroker:
    """One KRaft node (broker + controller) on loopback, its state in `home`."""

    home: Path
    port: int = 9092
    controller_port: int | None = None
    heap_mb: int = 512
    extra_properties: dict[str, str] | None = None
    # SCRAM users (name → password; they may use PLAIN too): adds a SASL_PLAINTEXT listener
    # on `sasl_port` and turns on ACLs. The PLAINTEXT listener stays for the broker itself
    # (its principal, ANONYMOUS, is a super user), so only clients on the SASL port are held
    # to the ACLs.
    scram_users: dict[str, str] | None = None
    sasl_port: int | None = None
    # With SCRAM users: a PEM file with the broker's private key (unencrypted PKCS#8) and
    # certificate chain makes that listener SASL_SSL (TLS) instead of SASL_PLAINTEXT.
    tls_keystore: Path | None = None
    # The nodes of a cluster share one id (formatted into each data folder); None draws one.
    cluster_id: str | None = None
    jvm_flags: tuple[str, ...] = ()
    # The node ends when the thread that launched it does (Linux), even by SIGKILL: for a
    # broker of one command's own (`stream bench`), never one meant to outlive its command.
    die_with_parent: bool = False
    # Kept so the child is reaped by us (and Popen does not warn that it still runs).
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_start: int = field(default=0, init=False, repr=False)  # where this start's log began

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return "the Kafka broker"

    @property
    def log_file(self) -> Path:
        return self.home / "broker.log"

    @property
    def _pid_file(self) -> Path:
        return self.home / "broker.pid"

    def pid(self) -> int | None:
        """The broker's pid if it is running, else None."""
        if self._process is not None and self._process.poll() is not None:
            self._process = None  # our child, ended by someone else (reaped now: no zombie)
        try:
            pid = int(self._pid_file.read_text())
        except (OSError, ValueError):
            return None
        # A stale file's pid (after a reboot) may be anyone's, another home's node too:
        # ours runs with this home's properties file among its arguments.
        return pid if runs(pid, str(self.home / "server.properties")) else None

    def start(self, *, timeout_s: float = 90.0) -> bool:
        """Start the broker in the background and wait until it answers Kafka requests (one
        already running from `home`, perhaps just launched by another start: until it does).
        False when it was running already."""
        process = self.launch()
        if process is None:
            self._wait_theirs(timeout_s)
            return False
        try:
            self.wait_ready(process, timeout_s)
        except BaseException:  # failed, or Ctrl-C: a broker half started is left to no one
            self.stop()
            raise
        return True

    def _wait_theirs(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.pid() is None:
                raise BrokerError(
                    f"{self.name} of {self.home} exited while starting; see {self.log_file}"
                )
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"{self.name} of {self.home} did not become ready in {timeout_s:.0f} s"
                )
            time.sleep(0.2)

    def running_port(self) -> int | None:
        """The port of the node running from `home`, None when none runs or it cannot be told."""
        return self.home_port() if self.pid() is not None else None

    def home_port(self) -> int | None:
        """The port `home`'s node was last started on, running or not (its first listener,
        as written in its server.properties); None when it cannot be told."""
        path = self.home / "server.properties"
        try:  # (a FIFO would hang the read: it holds no properties)
            text = path.read_text(errors="replace") if path.is_file() else ""
        except OSError:
            return None
        found = re.search(r"^listeners=[A-Z_]+://[^,\n]*:(\d+)", text, re.MULTILINE)
        port = int(found.group(1)) if found else 0
        return port if 0 < port < 65536 else None

    def check_port(self) -> None:
        """A `BrokerError` when the node of `home` runs on another port than `port`: asked
        to act on one port, acting on another would hand out an address that answers
        nothing (start, status) or stop a broker someone else uses (stop)."""
        running = self.running_port()
        if running is not None and running != self.port:
            raise BrokerError(
                f"the broker of {self.home} runs on port {running}, not {self.port}: pass "
                f"--port {running}, or another --home"
            )

    def launch(self) -> subprocess.Popen[bytes] | None:
        """Start the node's process without waiting for it (None: it already runs), so that
        the nodes of a cluster start side by side. Two starts at once from one home: the
        second waits for the first to launch, then finds it running."""
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            lock = open(self.home / "start.lock", "w")  # closed by the with below
        except OSError as exc:
            raise BrokerError(
                f"cannot use {self.home} ({exc.strerror}): pass a --home of yours"
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            return self._launch()

    def _launch(self) -> subprocess.Popen[bytes] | None:
        if self.pid() is not None:
            self.check_port()
            return None
        if port_open(self.port):
            raise BrokerError(
                f"port {self.port} is already in use by another program: stop it, or start "
                "the broker on another port (stream kafka start --port N)"
            )
        java = require("java", "to run the local Kafka broker")
        libs = fetch_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        properties = self._write_config()
        if self.controller_port is not None and port_open(self.controller_port):
            raise BrokerError(
                f"the controller port {self.controller_port} (kept in "
                f"{self.home / 'controller.port'}) is in use by another program: stop it, "
                "or delete that file to pick another"
            )
        self._format(java, libs, properties)
        # This start's own lines: the log is appended to, and an earlier start's cause
        # would be quoted as this one's.
        self._log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        command = [
            java,
            f"-Xms{min(256, self.heap_mb)}m",
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseSerialGC",
            *self.jvm_flags,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            "kafka.Kafka",
            str(properties),
        ]
        with open(self.home / "broker.out", "ab") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal() if self.die_with_parent else None,
            )
        self._process = process
        self._pid_file.write_text(str(process.pid))
        return process

    def stop(self, *, timeout_s: float = 30.0) -> bool:
        """Stop the broker: SIGTERM, SIGKILL after `timeout_s`. False if it was not running."""
        return self._end(signal.SIGTERM, timeout_s)

    def kill(self) -> bool:
        """SIGKILL the broker, as a crash would (chaos tests). False if it was not running."""
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: signal.Signals, grace_s: float) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        if self._process is not None and self._process.pid == pid:
            end(self._process, sig=sig, grace_s=grace_s)  # our child: waiting also reaps it
            self._process = None
        else:
            end_pid(pid, sig=sig, grace_s=grace_s)
        self._pid_file.unlink(missing_ok=True)
        return True

    def _write_config(self) -> Path:
        properties = self.home / "server.properties"
        values = self.properties()
        properties.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
        (self.home / "log4j2.properties").write_text(_LOG4J.format(log=self.log_file, level="INFO"))
        return properties

    def properties(self) -> dict[str, str]:
        """The node's server.properties (a cluster's nodes override this)."""
        if self.controller_port is None:
            saved = self.home / "controller.port"
            self.controller_port = int(saved.read_text()) if saved.exists() else free_port()
            saved.write_text(str(self.controller_port))
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.home / "data"),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            **self._sasl_properties(),
            **(self.extra_properties or {}),
        }

    def _sasl_properties(self) -> dict[str, str]:
        if not self.scram_users:
            return {}
        if self.sasl_port is None:
            self.sasl_port = free_port()
        plain = f"PLAINTEXT://127.0.0.1:{self.port}"
        protocol = "SASL_SSL" if self.tls_keystore else "SASL_PLAINTEXT"
        name = protocol.lower()
        sasl = f"{protocol}://127.0.0.1:{self.sasl_port}"
        tls = (
            {
                f"listener.name.{name}.ssl.keystore.type": "PEM",
                f"listener.name.{name}.ssl.keystore.location": str(self.tls_keystore),
            }
            if self.tls_keystore
            else {}
        )
        return {
            "listeners": f"{plain},{sasl},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"{plain},{sasl}",
            "listener.security.protocol.map": (
                f"PLAINTEXT:PLAINTEXT,{protocol}:{protocol},CONTROLLER:PLAINTEXT"
            ),
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            **{
                f"listener.name.{name}.{mechanism}.sasl.jaas.config": _SCRAM_LOGIN
                for mechanism in ("scram-sha-256", "scram-sha-512")
            },
            f"listener.name.{name}.plain.sasl.jaas.config": _PLAIN_LOGIN
            + "".join(f' user_{user}="{password}"' for user, password in self.scram_users.items())
            + ";",
            **tls,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": "User:ANONYMOUS",
        }

    def run_tool(self, main_class: str, *args: str, timeout_s: float = 120.0) -> str:
        """Run one of Kafka's own command-line tools (from the pinned jars) on this broker."""
        java = require("java", "to run Kafka's tools")
        done = subprocess.run(
            [
                java,
                "-Xmx256m",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                "-cp",
                f"{fetch_jars()}/*",
                main_class,
                "--bootstrap-server",
                self.bootstrap_servers,
                *args,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise BrokerError(f"{main_class.rsplit('.', 1)[-1]} failed: {done.stderr[-500:]}")
        return done.stdout

    def _format(self, java: str, libs: Path, properties: Path) -> None:
        if (self.home / "data" / "meta.properties").exists():
            return
        cluster_id = self.cluster_id or new_cluster_id()
        command = [
            java,
            *self.jvm_flags,
            "-cp",
            f"{libs}/*",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(properties),
        ]
        for name, password in (self.scram_users or {}).items():
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                command += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lines = (done.stdout + done.stderr).strip().splitlines() or ["(no output)"]
            # the line naming the cause, not the tail of a stack trace cut mid-word
            cause = next((line for line in lines if "Exception" in line or "Error" in line), None)
            raise BrokerError(
                f"formatting the broker's data folder failed: {(cause or lines[-1]).strip()[:300]}"
            )

    def _first_error(self) -> str:
        """The cause the broker logged, so the one-line error can say it."""
        try:
            with self.log_file.open("rb") as log:
                log.seek(self._log_start)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        for line in lines:
            if line.startswith(("java.", "org.apache.kafka.")) and ("Exception" in line):
                return f" ({line[:300]})"
        return ""

    def ready(self) -> bool:
        """True once the node serves what it is for (a broker: metadata requests)."""
        return port_open(self.port) and _answers_metadata(self.bootstrap_servers)

    def wait_ready(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        """Wait until `ready()`; a process that exits or a timeout is a `BrokerError`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._pid_file.unlink(missing_ok=True)
                raise BrokerError(
                    f"{self.name} exited with code {process.returncode} while starting"
                    f"{self._first_error()}; see {self.log_file}"
                )
            if self.ready():
                return
            time.sleep(0.2)
        self.stop()
        raise BrokerError(
            f"{self.name} did not become ready in {timeout_s:.0f} s; see {self.log_file}"
        )


def _answers_metadata(bootstrap: str) -> bool:
    """True once the broker serves metadata (the port opens a little before that)."""
    import asyncio

    return asyncio.run(brokers_listed(bootstrap)) is not None


async def brokers_listed(bootstrap: str) -> set[int] | None:
    """The node ids of the brokers the cluster's metadata lists; None while no broker at
    `bootstrap` answers a metadata request."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await admin.start()
        return {int(b["node_id"]) for b in (await admin.describe_cluster())["brokers"]}
    except Exception:  # any failure here only means "not ready yet"
        return None
    finally:
        await admin.close()
