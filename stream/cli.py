"""The `stream` command: one entry point, one sub-command per operator task.

Exit codes: 0 done; 1 failed (one line on stderr says why and what to do); 2 usage error;
3 something needs a person (topic drift that apply will not fix, a stalled consumer group);
130 interrupted (Ctrl-C); 141 its reader went away (`| head`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from stream import __version__
from stream.errors import EXIT_FAILED, EXIT_USAGE, StreamError, UsageError

if TYPE_CHECKING:
    from stream.config import Settings

__all__ = ["COMMANDS", "build_parser", "main"]

Handler = Callable[[argparse.Namespace, "Settings"], int]

# Each command's module, which has `register(commands)`: it adds the command's parser to
# the `argparse` sub-parsers and sets `handler` (a `Handler`) as its default. Only the
# module of the command asked for is imported (all of them for `stream --help`): a
# one-shot `stream lag` must not pay for the worker's HTTP stack.
COMMANDS: dict[str, str] = {
    "kafka": "stream.devtools.kafkacli",
    "topics": "stream.topicscli",
    "run": "stream.worker",
    "demo": "stream.devtools.demo",
    "simulate": "stream.devtools.simulator",
    "lag": "stream.observe.lagcli",
    "replay": "stream.backfill.replaycli",
    "redrive": "stream.backfill.redrivecli",
    "bench": "stream.devtools.bench",
}
# The commands that talk to Kafka: each takes --bootstrap-server and --command-config, as
# Kafka's own tools do (`kafka` runs the local broker; `simulate` never touches Kafka).
KAFKA_COMMANDS: tuple[str, ...] = ("run", "topics", "lag", "replay", "redrive", "demo", "bench")
# Commands that read no setting from the environment: a worker setting gone wrong must not
# keep an operator from stopping the local broker.
SELF_CONTAINED: tuple[str, ...] = ("kafka", "simulate")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `stream` command line; with `argv`, only the command it names is registered."""
    parser = argparse.ArgumentParser(
        prog="stream",
        description="Run LLM prediction requests from Kafka on Synthetic, with a Together AI "
        "fallback; one terminal record per request.",
        epilog="Configuration comes from the environment (KAFKA_BOOTSTRAP_SERVERS, "
        "SYNTHETIC_API_KEY, TOGETHER_API_KEY, STREAM_*); see the README. Exit codes: 0 done, "
        "1 failed, 2 usage, 3 needs attention (drift, stalled group), 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from stream import clientconfig  # here, not above: see `main`

    asked = _command(sys.argv[1:] if argv is None else argv)
    for module in [COMMANDS[asked]] if asked else dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).register(commands)
    for name in KAFKA_COMMANDS:
        if name in commands.choices:
            clientconfig.add_options(commands.choices[name])
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command named on the command line (the first word that is not an option)."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


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
    # Until a command watches for signals itself (a worker drains on SIGTERM), SIGTERM
    # interrupts as Ctrl-C does: exit 130 with a line, not a silent death (143) while the
    # command's modules load (a helper's SIGTERM 0.2-0.7 s after launch).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a reader gone (`| head`) is still caught
        return code
    except KeyboardInterrupt:  # also while the command's modules are still being imported
        print("stream: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`stream kafka status | head -1`): stop as a tool killed by
        # SIGPIPE does, without a traceback (nor a second one as Python flushes at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait (blocked) while the body runs, and arrive as it ends."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _main(argv: Sequence[str] | None) -> int:
    # Imported here, inside `main`'s handler of Ctrl-C, with SIGINT and SIGTERM held until
    # they are loaded (~0.3 s: pydantic, orjson, aiokafka): an interrupt then is an
    # interrupt, not a traceback, and never lands inside a native module's initialisation
    # (orjson's crashed the interpreter, exit -11, in 54 of 60 tries).
    with _signals_held():
        from stream import clientconfig, logs
        from stream.config import Settings

        parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        if args.command in SELF_CONTAINED:
            settings = Settings()
        else:
            settings = Settings.from_env(clientconfig.environment(args, os.environ))
        logs.configure(settings.log_level, json=False, content=settings.log_content)
        handler: Handler = args.handler
        return handler(args, settings)
    except UsageError as exc:
        print(f"stream {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
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


if __name__ == "__main__":
    sys.exit(main())
