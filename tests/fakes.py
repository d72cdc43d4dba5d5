"""Stand-ins with the exact shapes the engine (built elsewhere) exposes to metrics and health."""

from __future__ import annotations

from typing import NamedTuple

import anyio


class PartitionSnapshot(NamedTuple):
    topic: str
    partition: int
    in_flight: int
    next_offset: int
    finished_uncommitted: int
    paused: bool
    oldest_in_flight_timestamp_ms: int | None


class EngineSnapshot(NamedTuple):
    name: str
    group_id: str
    guarantee: str
    assigned: int
    in_flight: int
    records_in: int
    records_done: int
    handler_errors: int
    commits: int
    last_commit_seconds: float
    partitions: tuple[PartitionSnapshot, ...]


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

    def snapshot(self) -> EngineSnapshot:
        return self.state
