"""`stream kafka start|stop|status`: the local single-node broker, or with `--brokers N` a
local cluster (`stream.devtools.cluster`), and one of its nodes with `--broker N` or
`--controller N` (`stop --kill` is a SIGKILL, as a crash would be)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from stream.config import Settings
from stream.devtools import processes
from stream.devtools.broker import LocalBroker
from stream.devtools.cluster import CONTROLLERS, MAX_BROKERS, ClusterNode, LocalCluster
from stream.devtools.jars import KAFKA_VERSION, cache_dir
from stream.errors import EXIT_ATTENTION, EXIT_FAILED, BrokerError, UsageError

__all__ = ["register"]


def _home(args: argparse.Namespace, default: str) -> Path:
    home = Path(args.home or cache_dir() / default)
    if home.exists() and not home.is_dir():
        raise BrokerError(f"--home {home} is a file: give a folder (it is made if missing)")
    return home


_DEFAULT_PORT = 9092


def _port(text: str) -> int:
    """--port: a listener port a broker can bind (not 0: the port must be known)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1-65535")
    return port


def _layout(home: Path, port: int | None) -> tuple[int, int | None]:
    """(brokers, port) of the cluster `home` holds, as it was started (the port asked for
    wins); (1, port) for a home without one."""
    layout = home / "cluster.json"
    try:
        if not layout.is_file() or layout.stat().st_size > 4096:  # a FIFO would hang
            return 1, port
        saved = json.loads(layout.read_text())
        brokers, first = int(saved["brokers"]), int(saved["port"])
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError, RecursionError):
        return 1, port
    return (brokers, port or first) if 1 < brokers <= MAX_BROKERS else (1, port)


def _single(args: argparse.Namespace) -> int:
    home = _home(args, "broker")
    if (home / "cluster.json").exists():
        brokers, port = _layout(home, None)
        made = f" (--brokers {brokers} --port {port})" if brokers > 1 else ""
        raise BrokerError(
            f"{home} holds a local cluster: pass --brokers as when it was started{made}"
        )
    # without --port: the port the home's broker runs on, or ran on when it last started
    # (its home says it; a stopped home's is no 9092, nor is its next start moved there)
    port = args.port or LocalBroker(home=home).home_port() or _DEFAULT_PORT
    broker = LocalBroker(home=home, port=port)
    if args.action != "start":  # (a start checks it as it launches)
        broker.check_port()  # the home's broker, on the port asked for: or say which
    if args.action == "start":
        state = "started" if broker.start() else "already running"
    elif args.action == "stop":
        state = "stopped" if broker.stop() else "not running"
    else:
        state = "running" if broker.pid() is not None else "not running"
    if args.json:
        print(json.dumps(_report(state, broker.bootstrap_servers, broker.pid(), broker.home)))
    elif state == "not running":
        print(f"Kafka is not running (home {broker.home}){_start_hint(args)}")
    elif args.action == "stop":
        print("Kafka stopped")
    else:
        print(
            f"Kafka {KAFKA_VERSION} {state} at {broker.bootstrap_servers} "
            f"(pid {broker.pid()}, data in {broker.home})"
        )
    return EXIT_FAILED if args.action == "status" and state == "not running" else 0


def _start_hint(args: argparse.Namespace) -> str:
    """For `status` of a broker that is not running: the command that starts it."""
    if args.action != "status":
        return ""
    home = f" --home {shlex.quote(str(args.home))}" if args.home else ""
    port = f" --port {args.port}" if args.port else ""
    return f"; `stream kafka start{port}{home}` starts it"


def _report(state: str, bootstrap: str, pid: int | None, home: Path) -> dict[str, object]:
    """`kafka start|stop|status --json`: the shape the README documents."""
    return {
        "state": state,
        "running": state in ("started", "already running", "running"),
        "version": KAFKA_VERSION,
        "bootstrap_servers": bootstrap,
        "pid": pid,
        "home": str(home),
    }


def _cluster(args: argparse.Namespace) -> int:
    port = args.port or _DEFAULT_PORT
    cluster = LocalCluster(home=_home(args, "cluster"), port=port, brokers=args.brokers)
    cluster.check_layout()
    one = _chosen(args, cluster)
    if args.action == "status":
        return _status(cluster, [one] if one else cluster.nodes, json_out=args.json)
    if one is not None:
        return _one(args, cluster, one)
    if args.action == "start":
        started = cluster.start()
        state = "started" if started else "already running"
        done = f"started {len(started)} of {len(cluster.nodes)} processes" if started else state
    else:
        stopped = cluster.stop()
        state = "stopped" if stopped else "not running"
        done = f"{stopped} processes stopped" if stopped else state
    if args.json:
        print(json.dumps(_cluster_report(cluster, state, cluster.nodes)))
    else:
        print(
            f"Kafka {KAFKA_VERSION} cluster at {cluster.bootstrap_servers}: "
            f"{cluster.brokers} brokers, {CONTROLLERS} controllers ({done}; data in {cluster.home})"
        )
    return 0


def _cluster_report(
    cluster: LocalCluster, state: str, nodes: list[ClusterNode]
) -> dict[str, object]:
    """The single broker's shape, with `pid` null and each node in `nodes`."""
    report = _report(state, cluster.bootstrap_servers, None, cluster.home)
    report["nodes"] = [{"name": n.name, "port": n.port, "pid": n.pid()} for n in nodes]
    return report


def _chosen(args: argparse.Namespace, cluster: LocalCluster) -> ClusterNode | None:
    try:
        if args.broker is not None:
            return cluster.node("broker", args.broker)
        if args.controller is not None:
            return cluster.node("controller", args.controller)
    except BrokerError as exc:  # a number the cluster has no node for: a usage error
        raise UsageError(str(exc)) from None
    return None


def _one(args: argparse.Namespace, cluster: LocalCluster, node: ClusterNode) -> int:
    if args.action == "start":
        state = "started" if cluster.start_node(node) else "already running"
        text = f"{node.name} {state} at port {node.port}"
    elif cluster.stop_node(node, kill=args.kill):
        how = "killed (SIGKILL)" if args.kill else "stopped (clean shutdown)"
        state, text = "stopped", f"{node.name} {how}"
    else:
        state, text = "not running", f"{node.name} was not running"
    print(json.dumps(_cluster_report(cluster, state, [node])) if args.json else text)
    return 0


def _status(cluster: LocalCluster, nodes: list[ClusterNode], *, json_out: bool) -> int:
    up = sum(node.pid() is not None for node in nodes)
    code = 0 if up == len(nodes) else EXIT_FAILED if up == 0 else EXIT_ATTENTION
    state = {0: "running", EXIT_FAILED: "not running"}.get(code, "partly running")
    if json_out:
        print(json.dumps(_cluster_report(cluster, state, nodes)))
        return code
    for node in nodes:
        pid = node.pid()
        running = f"running (pid {pid})" if pid else "stopped"
        print(f"{node.name:<13} 127.0.0.1:{node.port:<6} {running}")
    if code == 0:
        print(f"bootstrap: {cluster.bootstrap_servers}")
    return code


def _kafka(args: argparse.Namespace, settings: Settings) -> int:
    # SIGTERM (`timeout 60 stream kafka start`) ends a start as Ctrl-C does: the nodes it
    # launched are stopped on the way out, not left half started
    with processes.interruptible():
        return _kafka_command(args)


def _kafka_command(args: argparse.Namespace) -> int:
    if args.kill and (args.action != "stop" or args.broker is args.controller is None):
        raise UsageError("--kill goes with stop --broker N or stop --controller N")
    if args.action != "start" and args.home:  # stop, status: the home says its layout
        brokers, port = _layout(Path(args.home), args.port)
        args.brokers = brokers if args.brokers is None else args.brokers
        args.port = port if args.brokers == brokers else args.port
    args.brokers = args.brokers or 1
    if args.brokers == 1:
        if args.broker is not None or args.controller is not None:
            raise UsageError("--broker and --controller name a node of a cluster (--brokers N)")
        return _single(args)
    return _cluster(args)


def register(commands: Any) -> None:
    kafka = commands.add_parser(
        "kafka",
        help="start, stop or check the local Kafka broker (or cluster)",
        description="A KRaft broker on loopback from the pinned Apache Kafka jars (fetched "
        "with Maven once); with --brokers N, N brokers beside a quorum of three controllers "
        "(broker i on port P+i-1, controller j on P+N+j-1). stop/status take the same "
        "--brokers, --port and --home as start (a single broker's --port may be left out, "
        "start's too: its --home knows the port it last ran on). `status` exits 1 when "
        "nothing runs, 3 when a node of a cluster is down.",
        epilog="examples: stream kafka start --brokers 3 --port 19092; "
        "stream kafka stop --brokers 3 --port 19092 --broker 2 --kill; "
        "stream kafka start --brokers 3 --port 19092 --broker 2",
    )
    kafka.add_argument("action", choices=["start", "stop", "status"], metavar="{start,stop,status}")
    kafka.add_argument(
        "--port",
        type=_port,
        help=f"the (first) broker's listener (default {_DEFAULT_PORT}; a single broker's "
        "default, for start, stop and status: the port its --home last ran on, if it has)",
    )
    kafka.add_argument(
        "--home",
        help="state folder (default ~/.cache/prediction-stream/broker, or …/cluster)",
    )
    kafka.add_argument(
        "--brokers",
        type=int,
        choices=range(1, MAX_BROKERS + 1),
        metavar="N",
        help="1 (default): one combined broker+controller; 2-9: a cluster (stop and status "
        "of a --home: as it was started)",
    )
    node = kafka.add_mutually_exclusive_group()
    node.add_argument("--broker", type=int, metavar="N", help="only broker N (1-based)")
    node.add_argument(
        "--controller", type=int, metavar="N", help=f"only controller N (1-{CONTROLLERS})"
    )
    kafka.add_argument(
        "--kill", action="store_true", help="with stop --broker/--controller: SIGKILL it"
    )
    kafka.add_argument(
        "--json",
        action="store_true",
        help="print {state, running, version, bootstrap_servers, pid, home} as JSON "
        "(a cluster adds nodes: [{name, port, pid}])",
    )
    kafka.set_defaults(handler=_kafka)
