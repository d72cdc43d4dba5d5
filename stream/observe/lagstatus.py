"""The status of a consumer group's partition over a sliding window of lag samples.

Pure code, no I/O: `evaluate(samples)` looks at the window the way Burrow's rules do, with
two signals Burrow lacks — the age of the oldest unprocessed record (`lag_seconds`) and the
commit metadata in which the engine lists finished offsets above its watermark. A sample's
`position` is the group's committed offset, or the log start where it never committed (where
the engine starts reading); its `lag` counts what waits there. The rules, first match wins:

    UNKNOWN  the latest sample has no position or no lag: nothing is assumed.
    REWIND   the position went backwards between two samples (a reset or replay). Burrow's.
    OK       the lag was zero (or below) in any sample: the consumer caught up within the
             window. An idle topic with zero lag is OK, whether or not anyone consumes it.
    With one sample only (a one-shot `stream lag`), the remaining lag says:
      OK       the oldest unprocessed record is younger than `stall_after_s`;
      UNOWNED  it is older, and no live member owns the partition;
      BEHIND   it is older, with an owner (or ownership unknown): one look cannot tell a
               stall from a backlog being worked off;
      UNKNOWN  its age is unknown.
    With a window:
      STALL    the position did not move over the window, the lag stayed above zero, nothing
               finished above the watermark (the metadata did not change either), the oldest
               unprocessed record has waited at least `stall_after_s` (or its age is
               unknown), and a live member owns the partition (or ownership is unknown): a
               consumer is there and makes no progress. Burrow's STALL.
      UNOWNED  the same, but no live member owns the partition: nobody consumes it. (Burrow's
               STOP means "no commits for a while", which offsets alone cannot show: hence
               a name of our own.)
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
    lag_seconds: float | None = None


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
    if len(known) < 2:
        return _one_look(known[-1], stall_after_s)
    if (
        offsets[0] == offsets[-1]
        and not _finished_above(known)
        and _waited(known[-1], stall_after_s)
    ):
        return Status.UNOWNED if known[-1].owned is False else Status.STALL
    if lags[-1] > lags[0] and all(later >= earlier for earlier, later in pairwise(lags)):
        return Status.WARN
    return Status.OK


def _one_look(sample: Sample, stall_after_s: float) -> Status:
    """A single sample with lag: only the age of the oldest waiting record speaks."""
    if sample.lag_seconds is None:
        return Status.UNKNOWN
    if sample.lag_seconds < stall_after_s:
        return Status.OK
    return Status.UNOWNED if sample.owned is False else Status.BEHIND


def worst(statuses: Sequence[Status]) -> Status:
    """The most alarming of `statuses` (OK for none)."""
    return max(statuses, key=_SEVERITY.__getitem__, default=Status.OK)


def _finished_above(samples: Sequence[Sample]) -> bool:
    """True when the commit metadata changed: records above the watermark finished."""
    known = [s.metadata for s in samples if s.metadata is not None]
    return len(set(known)) > 1


def _waited(sample: Sample, stall_after_s: float) -> bool:
    return sample.lag_seconds is None or sample.lag_seconds >= stall_after_s


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
