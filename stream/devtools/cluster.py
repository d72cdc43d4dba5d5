"""A local Kafka cluster (KRaft) on loopback: N brokers beside a quorum of three controllers.

The tests of leader loss, `./dev chaos --brokers 3` and `stream kafka start --brokers 3` run
it, from the same pinned jars as the single-node broker (`stream.devtools.broker`); each
node is its own JVM with its own port and data folder, and all start side by side.

Why a separate controller quorum rather than three combined broker+controller nodes:
- any one process can be SIGKILLed and the cluster goes on either way (2 of 3 voters
  remain; every partition keeps 2 of its 3 replicas);
- two brokers down is the failure that matters in production, and only a separate quorum
  shows it as production does: the controllers fence the dead brokers, shrink every ISR to
  the survivor, which stays leader and refuses `acks=all` writes with NotEnoughReplicas
  (`min.insync.replicas` 2) while consumers go on reading. With combined nodes, two nodes
  down also loses the quorum: metadata freezes with dead leaders, a whole-cluster outage
  that production clusters (dedicated controllers, as Kafka recommends) do not have;
- the cost is three more JVMs, small ones: a controller's heap is capped at 128 MB, a
  broker's at 384 MB (measured RSS in the README), so the cluster fits beside the tests.

Layout for `--port P` and N brokers: broker i (node id i) listens on P+i-1, controller j
(node id 100+j) on P+N+j-1; state under HOME/broker-i and HOME/controller-j, and the layout
in HOME/cluster.json, which later commands on that HOME must match.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from aiokafka import TopicPartition

from stream.config import KafkaSettings
from stream.devtools.broker import LocalBroker, brokers_listed, new_cluster_id, port_open
from stream.errors import BrokerError
from stream.kafka import admin_client

__all__ = [
    "CONTROLLERS",
    "ClusterNode",
    "LocalCluster",
    "PartitionState",
    "describe_partitions",
    "free_ports",
]

# Between the usual service ports and the system's ephemeral range (32768 and up on Linux).
_PRIVATE_PORTS = (20000, 32000)
CONTROLLERS = 3  # voters: one can be lost and the quorum (2) remains
MAX_BROKERS = 9
_CONTROLLER_ID_BASE = 100
# What `stream kafka start` without --brokers leaves in its HOME (a cluster's nodes have theirs
# in HOME/broker-i and HOME/controller-j)
_SINGLE_BROKER_FILES = ("broker.pid", "server.properties")
Role = Literal["broker", "controller"]

# The same defaults a production cluster has (replication 3, transaction log min ISR 2),
# with threads and buffers sized for six JVMs on two cores.
_BROKER_DEFAULTS = {
    "auto.create.topics.enable": "false",
    "offsets.topic.num.partitions": "3",
    "transaction.state.log.num.partitions": "3",
    "transaction.state.log.min.isr": "2",
    "group.initial.rebalance.delay.ms": "0",
    "num.network.threads": "2",
    "num.io.threads": "4",
    "background.threads": "4",
    # the log cleaner's 128 MB default dedupe buffer would take a third of the heap
    "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
}


# The client JIT only: six JVMs starting at once on two cores spend most of their start-up
# compiling; C1 code is fast enough for a test cluster's load.
_JVM_FLAGS = ("-XX:TieredStopAtLevel=1",)


@dataclass
class ClusterNode(LocalBroker):
    """One process of a `LocalCluster`: a broker or a controller, never both."""

    role: Role = "broker"
    node_id: int = 1
    voters: str = ""  # controller.quorum.voters
    replication: int = 3  # of the internal topics: the number of brokers, at most 3

    @property
    def name(self) -> str:
        number = self.node_id - (_CONTROLLER_ID_BASE if self.role == "controller" else 0)
        return f"{self.role} {number}"

    def properties(self) -> dict[str, str]:
        common = {
            "process.roles": self.role,
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "controller.listener.names": "CONTROLLER",
            "log.dirs": str(self.home / "data"),
        }
        if self.role == "controller":
            return {
                **common,
                "listeners": f"CONTROLLER://127.0.0.1:{self.port}",
                "listener.security.protocol.map": "CONTROLLER:PLAINTEXT",
                "num.partitions": "1",  # a controller's setting in KRaft
                "num.network.threads": "1",
                "num.io.threads": "2",
            }
        replication = str(self.replication)
        return {
            **common,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "offsets.topic.replication.factor": replication,
            "transaction.state.log.replication.factor": replication,
            "share.coordinator.state.topic.replication.factor": replication,
            **_BROKER_DEFAULTS,
            **(self.extra_properties or {}),
        }

    def ready(self) -> bool:
        # A controller serves only its quorum port; a broker is ready once it answers
        # metadata, which it does only after the controllers let it in (unfenced).
        return port_open(self.port) if self.role == "controller" else super().ready()


class PartitionState(NamedTuple):
    leader: int  # node id, -1 when the partition has none
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass
class LocalCluster:
    """N brokers and three controllers on loopback, each a `ClusterNode` in `home`."""

    home: Path
    port: int = 9092
    brokers: int = 3
    broker_heap_mb: int = 384
    controller_heap_mb: int = 128
    extra_properties: dict[str, str] = field(default_factory=dict)  # every broker's
    nodes: list[ClusterNode] = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.brokers <= MAX_BROKERS:
            raise BrokerError(f"a local cluster has 1 to {MAX_BROKERS} brokers, not {self.brokers}")
        if not 1024 <= self.port <= 65535 - self.brokers - CONTROLLERS:
            raise BrokerError(
                f"--port {self.port} leaves no room for the cluster's {self.brokers + CONTROLLERS}"
                " consecutive ports: use a port between 1024 and 65000"
            )
        first_controller = self.port + self.brokers
        voters = ",".join(
            f"{_CONTROLLER_ID_BASE + j}@127.0.0.1:{first_controller + j - 1}"
            for j in range(1, CONTROLLERS + 1)
        )
        self.nodes = [
            self._node("broker", i, self.port + i - 1, voters) for i in range(1, self.brokers + 1)
        ] + [
            self._node("controller", _CONTROLLER_ID_BASE + j, first_controller + j - 1, voters)
            for j in range(1, CONTROLLERS + 1)
        ]

    def _node(self, role: Role, node_id: int, port: int, voters: str) -> ClusterNode:
        number = node_id - (_CONTROLLER_ID_BASE if role == "controller" else 0)
        return ClusterNode(
            home=self.home / f"{role}-{number}",
            port=port,
            heap_mb=self.broker_heap_mb if role == "broker" else self.controller_heap_mb,
            extra_properties=self.extra_properties,
            role=role,
            node_id=node_id,
            voters=voters,
            replication=min(3, self.brokers),
            jvm_flags=_JVM_FLAGS,
        )

    # -- where things are -----------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """Every broker: a client that knows only a dead one could not bootstrap."""
        return ",".join(node.bootstrap_servers for node in self.broker_nodes)

    @property
    def broker_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.role == "broker"]

    def node(self, role: Role, number: int) -> ClusterNode:
        """Broker `number` (1…N) or controller `number` (1…3)."""
        nodes = [node for node in self.nodes if node.role == role]
        if not 1 <= number <= len(nodes):
            raise BrokerError(f"there is no {role} {number}: this cluster has 1 to {len(nodes)}")
        return nodes[number - 1]

    def broker(self, node_id: int) -> ClusterNode:
        return self.node("broker", node_id)

    @property
    def _layout_file(self) -> Path:
        return self.home / "cluster.json"

    def check_layout(self) -> None:
        """A HOME made for another layout is refused in one line: its controllers' quorum
        and its nodes' data were made for those ports and that many brokers. A HOME a single
        broker was made in is refused too: that broker would run on beside the cluster, out of
        reach of both commands (the single broker's are refused in a cluster's HOME)."""
        if any((self.home / name).exists() for name in _SINGLE_BROKER_FILES):
            running = LocalBroker(home=self.home).pid() is not None
            raise BrokerError(
                f"{self.home} holds a single broker (made without --brokers"
                + (f"; it runs: stream kafka stop --home {self.home})" if running else ")")
                + ": pass another --home for a cluster"
            )
        try:
            saved = json.loads(self._layout_file.read_text())
        except (OSError, ValueError):
            return
        if (saved.get("brokers"), saved.get("port")) != (self.brokers, self.port):
            raise BrokerError(
                f"{self.home} holds a cluster made with --brokers {saved.get('brokers')} "
                f"--port {saved.get('port')}: pass those, or another --home"
            )

    def run_tool(self, main_class: str, *args: str) -> str:
        """One of Kafka's own command-line tools, bootstrapped from a running broker."""
        broker = next((node for node in self.broker_nodes if node.pid()), None)
        if broker is None:
            raise BrokerError(f"no broker of the cluster in {self.home} is running")
        return broker.run_tool(main_class, *args)

    def quorum_leader(self) -> ClusterNode:
        """The active controller, as the quorum tells it (Kafka's own tool; a JVM start)."""
        status = self.run_tool(
            "org.apache.kafka.tools.MetadataQuorumCommand", "describe", "--status"
        )
        found = re.search(r"^LeaderId:\s+(\d+)", status, re.MULTILINE)
        if found is None:
            raise BrokerError(f"the quorum named no leader: {status[:300]}")
        return self.node("controller", int(found.group(1)) - _CONTROLLER_ID_BASE)

    # -- start and stop -------------------------------------------------------------------

    def start(self, *, timeout_s: float = 120.0) -> list[ClusterNode]:
        """Start every node that is not running, side by side; wait until every broker is
        in the cluster. Returns the nodes it started."""
        self.check_layout()
        self.home.mkdir(parents=True, exist_ok=True)
        if not self._layout_file.exists():
            layout = {"brokers": self.brokers, "port": self.port, "cluster_id": new_cluster_id()}
            self._layout_file.write_text(json.dumps(layout))
        cluster_id = json.loads(self._layout_file.read_text())["cluster_id"]
        todo = [node for node in self.nodes if node.pid() is None]
        for node in todo:
            node.cluster_id = cluster_id
        try:
            processes = _each(todo, lambda node: node.launch())
            _each(
                [(n, p) for n, p in zip(todo, processes, strict=True) if p is not None],
                lambda pair: pair[0].wait_ready(pair[1], timeout_s),
            )
            self._wait_registered(timeout_s)
        except BaseException:  # failed, or Ctrl-C: a half-started cluster is worse than none
            for node in todo:
                node.kill()
            raise
        return todo

    def start_node(self, node: ClusterNode, *, timeout_s: float = 90.0) -> bool:
        """Start one node of a cluster made before; False when it was running already."""
        if node.pid() is not None:
            return False
        self.check_layout()
        try:
            node.cluster_id = json.loads(self._layout_file.read_text())["cluster_id"]
        except (OSError, ValueError, KeyError) as exc:
            raise BrokerError(
                f"no cluster in {self.home}: start it whole first (stream kafka start "
                f"--brokers {self.brokers} --port {self.port} --home {self.home})"
            ) from exc
        node.start(timeout_s=timeout_s)
        if node.role == "broker":
            self._wait_registered(timeout_s, {node.node_id})
        return True

    def stop_node(self, node: ClusterNode, *, kill: bool = False) -> bool:
        """Stop one node: a clean shutdown (SIGTERM; a broker first hands its leaderships
        over), or with `kill` a SIGKILL, as a crash would. False when it was not running."""
        return node.kill() if kill else node.stop()

    def stop(self) -> int:
        """Stop every node, brokers first (their clean shutdown needs the controllers);
        return how many were running."""
        stopped = _each(self.broker_nodes, lambda node: node.stop())
        stopped += _each([n for n in self.nodes if n.role == "controller"], lambda n: n.stop())
        return sum(stopped)

    def kill(self) -> None:
        """SIGKILL every node (a test session that must end now)."""
        _each(self.nodes, lambda node: node.kill())

    def _wait_registered(self, timeout_s: float, wanted: Iterable[int] | None = None) -> None:
        """Until the metadata of the live brokers lists `wanted` (default: every broker)."""
        want = set(wanted or (node.node_id for node in self.broker_nodes))
        live = ",".join(node.bootstrap_servers for node in self.broker_nodes if node.pid())
        found = asyncio.run(_wait_brokers(live, want, timeout_s))
        if not want <= found:
            missing = ", ".join(str(n) for n in sorted(want - found))
            raise BrokerError(
                f"broker(s) {missing} did not join the cluster in {timeout_s:.0f} s; "
                f"see the broker.log files under {self.home}"
            )


def free_ports(count: int, *, tries: int = 50) -> int:
    """The first of `count` consecutive free loopback ports (a cluster's layout), below the
    range the system draws client ports from: the nodes format their storage before they
    bind, and meanwhile any outgoing connection could take a port from that range."""
    low, high = _PRIVATE_PORTS
    for _try in range(tries):
        first = random.randrange(low, high - count)
        if all(_bindable(first + i) for i in range(count)):
            return first
    raise BrokerError(f"found no {count} consecutive free ports on 127.0.0.1")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _each(items: list[Any], action: Callable[[Any], Any]) -> list[Any]:
    """`action` on every item at once (each mostly waits on a JVM); results in order."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(action, items))


async def _wait_brokers(bootstrap: str, want: set[int], timeout_s: float) -> set[int]:
    found: set[int] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline and not want <= found:
        listed = await brokers_listed(bootstrap)
        found = found if listed is None else listed  # None: not there yet, ask again
        if not want <= found:
            await asyncio.sleep(0.3)
    return found


async def describe_partitions(
    kafka: KafkaSettings, topics: Iterable[str]
) -> dict[TopicPartition, PartitionState]:
    """Leader, replicas and in-sync replicas of every partition of `topics`, as the
    brokers' metadata has them (tests and the chaos run pick leaders to kill with it)."""
    async with admin_client(kafka, doing="describing partitions") as admin:
        described = await admin.describe_topics(sorted(set(topics)))
    return {
        TopicPartition(topic["topic"], p["partition"]): PartitionState(
            leader=int(p["leader"]), replicas=tuple(p["replicas"]), isr=tuple(p["isr"])
        )
        for topic in described
        for p in topic["partitions"]
    }
