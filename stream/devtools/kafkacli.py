"""`stream kafka start|stop|status`: the local single-node broker, or with `--brokers N` a
local cluster (`stream.devtools.cluster`), and one of its nodes with `--broker N` or
`--controller N` (`stop --kill` is a SIGKILL, as a crash would be)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stream.config import Settings
from stream.devtools.broker import KAFKA_VERSION, LocalBroker, cache_dir
from stream.devtools.cluster import CONTROLLERS, MAX_BROKERS, ClusterNode, LocalCluster
from stream.errors import EXIT_ATTENTION, EXIT_FAILED, BrokerError

__all__ = ["register"]


def _single(args: argparse.Namespace) -> int:
    home = Path(args.home or cache_dir() / "broker")
    if (home / "cluster.json").exists():
        raise BrokerError(f"{home} holds a local cluster: pass --brokers as when it was started")
    broker = LocalBroker(home=home, port=args.port)
    if args.action == "start":
        already = broker.pid() is not None
        broker.start()
        state = "already running" if already else "started"
        print(
            f"Kafka {KAFKA_VERSION} {state} at {broker.bootstrap_servers} "
            f"(pid {broker.pid()}, data in {broker.home})"
        )
    elif args.action == "stop":
        print("Kafka stopped" if broker.stop() else "Kafka was not running")
    else:
        pid = broker.pid()
        if pid is None:
            print(f"Kafka is not running (home {broker.home})")
            return EXIT_FAILED
        print(f"Kafka {KAFKA_VERSION} running at {broker.bootstrap_servers} (pid {pid})")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    cluster = LocalCluster(
        home=Path(args.home or cache_dir() / "cluster"), port=args.port, brokers=args.brokers
    )
    cluster.check_layout()
    one = _chosen(args, cluster)
    if args.action == "status":
        return _status(cluster, [one] if one else cluster.nodes)
    if one is not None:
        return _one(args, cluster, one)
    if args.action == "start":
        started = cluster.start()
        state = f"started {len(started)} of {len(cluster.nodes)} processes" if started else ""
        print(
            f"Kafka {KAFKA_VERSION} cluster at {cluster.bootstrap_servers}: "
            f"{cluster.brokers} brokers, {CONTROLLERS} controllers "
            f"({state or 'already running'}; data in {cluster.home})"
        )
    else:
        stopped = cluster.stop()
        print(f"Kafka cluster stopped ({stopped} processes)" if stopped else "it was not running")
    return 0


def _chosen(args: argparse.Namespace, cluster: LocalCluster) -> ClusterNode | None:
    if args.broker is not None:
        return cluster.node("broker", args.broker)
    if args.controller is not None:
        return cluster.node("controller", args.controller)
    return None


def _one(args: argparse.Namespace, cluster: LocalCluster, node: ClusterNode) -> int:
    if args.action == "start":
        started = cluster.start_node(node)
        print(f"{node.name} {'started' if started else 'already running'} at port {node.port}")
    elif cluster.stop_node(node, kill=args.kill):
        print(f"{node.name} {'killed (SIGKILL)' if args.kill else 'stopped (clean shutdown)'}")
    else:
        print(f"{node.name} was not running")
    return 0


def _status(cluster: LocalCluster, nodes: list[ClusterNode]) -> int:
    up = 0
    for node in nodes:
        pid = node.pid()
        up += pid is not None
        state = f"running (pid {pid})" if pid is not None else "stopped"
        print(f"{node.name:<13} 127.0.0.1:{node.port:<6} {state}")
    if up == len(nodes):
        print(f"bootstrap: {cluster.bootstrap_servers}")
        return 0
    return EXIT_FAILED if up == 0 else EXIT_ATTENTION


def _kafka(args: argparse.Namespace, settings: Settings) -> int:
    if args.kill and (args.action != "stop" or args.broker is args.controller is None):
        raise BrokerError("--kill goes with stop --broker N or stop --controller N")
    if args.brokers == 1:
        if args.broker is not None or args.controller is not None:
            raise BrokerError("--broker and --controller name a node of a cluster (--brokers N)")
        return _single(args)
    return _cluster(args)


def register(commands: Any) -> None:
    kafka = commands.add_parser(
        "kafka",
        help="start, stop or check the local Kafka broker (or cluster)",
        description="A KRaft broker on loopback from the pinned Apache Kafka jars (fetched "
        "with Maven once); with --brokers N, N brokers beside a quorum of three controllers "
        "(broker i on port P+i-1, controller j on P+N+j-1). stop/status take the same "
        "--brokers, --port and --home as start.",
        epilog="examples: stream kafka start --brokers 3 --port 19092; "
        "stream kafka stop --brokers 3 --port 19092 --broker 2 --kill; "
        "stream kafka start --brokers 3 --port 19092 --broker 2",
    )
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument(
        "--port", type=int, default=9092, help="the (first) broker's listener (default 9092)"
    )
    kafka.add_argument(
        "--home",
        help="state folder (default ~/.cache/prediction-stream/broker, or …/cluster)",
    )
    kafka.add_argument(
        "--brokers",
        type=int,
        default=1,
        choices=range(1, MAX_BROKERS + 1),
        metavar="N",
        help="1 (default): one combined broker+controller; 2-9: a cluster",
    )
    node = kafka.add_mutually_exclusive_group()
    node.add_argument("--broker", type=int, metavar="N", help="only broker N (1-based)")
    node.add_argument(
        "--controller", type=int, metavar="N", help=f"only controller N (1-{CONTROLLERS})"
    )
    kafka.add_argument(
        "--kill", action="store_true", help="with stop --broker/--controller: SIGKILL it"
    )
    kafka.set_defaults(handler=_kafka)
