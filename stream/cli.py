"""The `stream` command: one entry point, one sub-command per operator task.

Exit codes: 0 done; 1 failed (one line on stderr says why and what to do); 2 usage error;
3 something needs a person (topic drift that apply will not fix, a stalled consumer group).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from stream import __version__, logs
from stream.config import Settings
from stream.errors import StreamError

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_ATTENTION = 3

Handler = Callable[[argparse.Namespace, Settings], int]

# Modules that add their own sub-commands: each has `register(commands)`, which adds a
# parser to the `argparse` sub-parsers and sets `handler` (a `Handler`) as its default.
COMMAND_MODULES: tuple[str, ...] = (
    "stream.worker",
    "stream.devtools.demo",
    "stream.devtools.simulator",
    "stream.observe.lag",
    "stream.backfill.replay",
    "stream.backfill.redrive",
    "stream.devtools.bench",
)


def _kafka(args: argparse.Namespace, settings: Settings) -> int:
    from stream.devtools.broker import KAFKA_VERSION, LocalBroker, cache_dir

    broker = LocalBroker(home=Path(args.home or cache_dir() / "broker"), port=args.port)
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


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    from stream import topics

    changes = asyncio.run(topics.plan(settings, add_partitions=args.add_partitions))
    width = max(len(change.topic) for change in changes)
    for change in changes:
        print(f"{change.topic:<{width}}  {change.action:<6}  {'; '.join(change.details)}")
    if not args.dry_run:
        asyncio.run(topics.apply(settings, changes))
        done = sum(change.action in ("create", "update") for change in changes)
        print(f"applied: {done} change{'s' if done != 1 else ''}")
    else:
        print("dry run: nothing changed")
    drift = [change.topic for change in changes if not change.fixable]
    if drift:
        print(f"drift left for a person: {', '.join(drift)}", file=sys.stderr)
        return EXIT_ATTENTION
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream",
        description="Run LLM prediction requests from Kafka on Synthetic, with a Together AI "
        "fallback; one terminal record per request.",
        epilog="Configuration comes from the environment (KAFKA_BOOTSTRAP_SERVERS, "
        "SYNTHETIC_API_KEY, TOGETHER_API_KEY, STREAM_*); see the README. Exit codes: 0 done, "
        "1 failed, 2 usage, 3 needs attention (drift, stalled group).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    kafka = commands.add_parser(
        "kafka",
        help="start, stop or check the local Kafka broker",
        description="A single-node KRaft broker on loopback, from the "
        "pinned Apache Kafka jars (fetched with Maven once).",
    )
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument("--port", type=int, default=9092, help="listener port (default 9092)")
    kafka.add_argument("--home", help="state folder (default ~/.cache/prediction-stream/broker)")
    kafka.set_defaults(handler=_kafka)

    topics = commands.add_parser(
        "topics",
        help="make the cluster's topics match topics/",
        description="Create missing topics and set declared configs. "
        "Never deletes; reports drift it will not fix (exit 3).",
    )
    topics.add_argument("action", choices=["apply"])
    topics.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    topics.add_argument(
        "--add-partitions",
        action="store_true",
        help="raise partition counts to the declared ones (moves keys)",
    )
    topics.set_defaults(handler=_topics)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)
    return parser


def _first_stream_error(group: BaseExceptionGroup[BaseException]) -> StreamError | None:
    for exc in group.exceptions:
        if isinstance(exc, StreamError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_stream_error(exc)
            if found is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        logs.configure(settings.log_level, json=False)
        handler: Handler = args.handler
        return handler(args, settings)
    except StreamError as exc:
        print(f"stream: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BaseExceptionGroup as group:
        # Task groups wrap what their tasks raise; a person still gets one line.
        error = _first_stream_error(group)
        if error is None:
            raise
        print(f"stream: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("stream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
