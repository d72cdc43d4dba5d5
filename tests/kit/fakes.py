"""A stand-in engine for metrics and health tests: a snapshot the test sets, a ready event."""

from __future__ import annotations

import anyio

from stream.engine.engine import EngineSnapshot, PartitionSnapshot

__all__ = ["EngineSnapshot", "FakeEngine", "PartitionSnapshot"]


class FakeEngine:
    """Holds a snapshot the test changes, and a `ready` event the test sets."""

    def __init__(self, name: str, group_id: str) -> None:
        self.name = name
        self.ready = anyio.Event()
        self.state = EngineSnapshot(
            name=name,
            group_id=group_id,
            guarantee="at-least-once",
            assigned=0,
            in_flight=0,
            records_in=0,
            records_done=0,
            handler_errors=0,
            commits=0,
            last_commit_seconds=0.0,
            partitions=(),
        )

        self.stuck: str | None = None  # what `problem()` says: set it to make the engine stuck

    def snapshot(self) -> EngineSnapshot:
        return self.state

    def problem(self) -> str | None:
        return self.stuck
