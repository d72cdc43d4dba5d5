"""A worker process for the crash tests: `python -m tests.engine_worker SOURCE SINK GROUP`.

Settings come from the environment (STREAM_GUARANTEE, STREAM_MAX_IN_FLIGHT …). Each handled
record's value is printed on stdout (one line, as it finishes) so the test knows when to
kill it, and its output names the worker's pid so duplicates can be traced.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from stream.config import Settings
from stream.engine.engine import Engine, Output
from stream.engine.signals import run_until_signal


def main() -> None:
    source, sink, group = sys.argv[1:4]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    settings = Settings.from_env()
    pid = str(os.getpid()).encode()

    async def handler(record: Any) -> Sequence[Output]:
        await anyio.sleep(random.uniform(0.05, 0.2))
        print(record.value.decode(), flush=True)
        # Keyed by the value, as an unkeyed request's result is by its request_id: placed
        # by that key's hash, not at the input's partition number.
        return [Output(sink, record.value, key=record.value, headers=(("pid", pid),))]

    def on_error(record: Any, exc: BaseException) -> Sequence[Output]:
        return [Output(sink, b"error:" + record.value)]

    engine = Engine(
        settings=settings,
        name="crash-worker",
        group_id=group,
        topics=[source],
        handler=handler,
        on_error=on_error,
        output_topics=[sink],
    )
    anyio.run(run_until_signal, engine)


if __name__ == "__main__":
    main()
