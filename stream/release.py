"""A record's leave to give its provider call back unpaid, while the call still waits to go
out (for the spend limit, a slot, a pause the provider asked for, a back-off).

The engine hands each record it runs the `Release` of its partition (`current`, a context
variable: the provider client, deep in the handler, reads it without the stage passing it
on). When the partition is handed over to another worker, the engine asks for the release
(`Release.ask`): every such wait of its records ends with `RecordReleased`, and so does
every one begun after, and the record goes back to its partition's queue, unfinished and
uncommitted. A handover then waits only for calls that are out, not for records queued
behind a model's concurrency limit (under 503s, a minute and more). A wait of a call that
was answered (a billed 200 it could not use) is not ended: running the record again would
pay again.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol

__all__ = ["Release", "current"]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Release:
    """A set of waits to end at once: a partition's (asked for its handover; a new one when
    it stays after all), or the client's own for a worker's shutdown (`Waits`)."""

    __slots__ = ("asked", "waits")

    def __init__(self) -> None:
        self.asked = False
        self.waits: set[Cancellable] = set()  # the cancel scopes of its records' waits

    def ask(self) -> int:
        """End the waits now under way, and make every later one end at once; how many
        were waiting."""
        self.asked = True
        for wait in self.waits:
            wait.cancel()
        return len(self.waits)


# The release of the record the running task works on (None outside an engine).
current: ContextVar[Release | None] = ContextVar("release", default=None)
