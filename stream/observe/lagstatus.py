"""The status of a consumer group's partition over a sliding window of lag samples.

Pure code, no I/O: `evaluate(samples)` looks at the window the way Burrow's rules do, with
two signals Burrow lacks — the age of the oldest unprocessed record and the commit metadata
in which the engine lists finished offsets above its watermark. A sample's `position` is the
group's committed offset, or the log start where it never committed (where the engine starts
reading); its `lag` counts what waits there. The age is a range (`stream.observe.lagage`):
a record's timestamp is only a hint, so it is OLD when it is surely older than
`stall_after_s` (`age_low`), YOUNG when it is surely younger (`age_high`), and neither when
nothing can tell. Offsets and ownership outrank any age. The rules, first match wins:

    UNKNOWN  the latest sample has no position or no lag: nothing is assumed.
    REWIND   the position went backwards between two samples (a reset or replay). Burrow's.
    OK       the lag was zero (or below) in any sample: the consumer caught up within the
             window. An idle topic with zero lag is OK, whether or not anyone consumes it.
    UNOWNED  records wait and no live member owns the partition: nobody consumes it, however
             young its records claim to be. (Burrow's STOP means "no commits for a while",
             which offsets alone cannot show: hence a name of our own.)
    With one sample only (a one-shot `stream lag`), the age of the oldest record says:
      BEHIND   OLD, with an owner (or ownership unknown): one look cannot tell a stall from
               a backlog being worked off;
      OK       YOUNG;
      UNKNOWN  neither.
    With a window:
      STALL    the position did not move over the window, the lag stayed above zero, nothing
               finished above the watermark (the metadata did not change either), and the
               oldest unprocessed record is OLD: a consumer is there and makes no progress.
               Burrow's STALL.
      UNKNOWN  the same, but the record is neither OLD nor YOUNG: a slow call and a stuck one
               look alike (a worker's monitor watches long enough to know, in time).
      WARN     the lag never fell between two samples and ended higher than it started: the
               consumer moves but falls behind. Burrow's.
      OK       anything else.

Why the age guard: the engine commits a contiguous watermark, so one slow LLM call (minutes,
for reasoning models) holds the committed offset still while hundreds of later records
finish. A window shorter than one call cannot tell "slow" from "stuck"; a record that has
waited longer than the longest call (`stall_after_s`, default 300 s) can. Its age is an
upper bound on how long the offset can have been stuck, so a young record rules a stall out.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from enum import StrEnum
from itertools import pairwise
from typing import Generic, NamedTuple, TypeVar

__all__ = ["ATTENTION", "DEFAULT_STALL_AFTER_S", "Sample", "Status", "Windows", "evaluate", "worst"]

K = TypeVar("K", bound=Hashable)

DEFAULT_STALL_AFTER_S = 300.0  # the longest LLM call the provider timeouts allow


class Status(StrEnum):
    OK = "OK"
    WARN = "WARN"
    BEHIND = "BEHIND"
    STALL = "STALL"
    UNOWNED = "UNOWNED"
    REWIND = "REWIND"
    UNKNOWN = "UNKNOWN"


# Statuses that need a person (`stream lag` exits 3); REWIND is reported, not alarmed on,
# because replays rewind on purpose.
ATTENTION = frozenset({Status.BEHIND, Status.STALL, Status.UNOWNED})

# For a group's summary: the most alarming status of its partitions.
_SEVERITY = {
    Status.OK: 0,
    Status.UNKNOWN: 1,
    Status.WARN: 2,
    Status.REWIND: 3,
    Status.BEHIND: 4,
    Status.STALL: 5,
    Status.UNOWNED: 6,
}


class Sample(NamedTuple):
    """One observation of one partition of one group."""

    at: float  # wall-clock seconds; only differences and order matter
    position: int | None  # the committed offset, or the log start where never committed
    lag: int | None  # records waiting (transaction markers alone are not lag)
    metadata: str | None = None  # commit metadata: changes when work finishes above it
    owned: bool | None = None  # a live group member is assigned the partition
    # the oldest waiting record is at least `age_low` and at most `age_high` seconds old
    age_low: float = 0.0
    age_high: float = math.inf


def evaluate(samples: Sequence[Sample], *, stall_after_s: float = DEFAULT_STALL_AFTER_S) -> Status:
    """The status of one partition over `samples` (oldest first); see the module docstring."""
    known = [s for s in samples if s.lag is not None and s.position is not None]
    if not known or known[-1] is not samples[-1]:
        return Status.UNKNOWN
    offsets = [s.position for s in known if s.position is not None]
    lags = [s.lag for s in known if s.lag is not None]
    if any(later < earlier for earlier, later in pairwise(offsets)):
        return Status.REWIND
    if min(lags) <= 0:
        return Status.OK
    latest = known[-1]
    if latest.owned is False:
        return Status.UNOWNED  # offsets say records wait: no timestamp makes that OK
    if len(known) < 2:
        return _one_look(latest, stall_after_s)
    if offsets[0] == offsets[-1] and not _finished_above(known):
        if latest.age_low >= stall_after_s:
            return Status.STALL
        if latest.age_high >= stall_after_s:
            return Status.UNKNOWN
    if lags[-1] > lags[0] and all(later >= earlier for earlier, later in pairwise(lags)):
        return Status.WARN
    return Status.OK


def _one_look(sample: Sample, stall_after_s: float) -> Status:
    """A single sample with lag and an owner: only the age of the oldest record speaks."""
    if sample.age_low >= stall_after_s:
        return Status.BEHIND
    if sample.age_high < stall_after_s:
        return Status.OK
    return Status.UNKNOWN


def worst(statuses: Sequence[Status]) -> Status:
    """The most alarming of `statuses` (OK for none)."""
    return max(statuses, key=_SEVERITY.__getitem__, default=Status.OK)


def _finished_above(samples: Sequence[Sample]) -> bool:
    """True when the commit metadata changed: records above the watermark finished."""
    known = [s.metadata for s in samples if s.metadata is not None]
    return len(set(known)) > 1


class Windows(Generic[K]):
    """The last `size` samples per key (group, topic, partition), oldest first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a window holds at least one sample")
        self.size = size
        self._windows: dict[K, deque[Sample]] = {}

    def add(self, key: K, sample: Sample) -> tuple[Sample, ...]:
        window = self._windows.setdefault(key, deque(maxlen=self.size))
        window.append(sample)
        return tuple(window)

    def retain(self, keys: set[K]) -> None:
        """Forget partitions no longer reported (revoked topics, deleted groups)."""
        for key in set(self._windows) - keys:
            del self._windows[key]

    def __len__(self) -> int:
        return len(self._windows)
