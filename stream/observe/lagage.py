"""How old the oldest waiting record is, and how sure we can be of it.

A record's timestamp is a hint, not the truth: on a CreateTime topic (the default) the
producer sets it freely, to 0, to -1 (none), or an hour ahead. What can be known comes from
our own clock and Kafka's offsets, the way kafka-lag-exporter measures lag in time from the
log end offsets it watched: a record at offset `o` existed when we saw the log end above
`o` (it is at least that old), and did not exist when we saw the log end at or below `o`
(it is at most that old). Its predecessor's timestamp bounds it too: a record is appended
after the record before it. The record's own timestamp is believed only where it fits those
bounds (give or take producer clock skew); otherwise only the bounds speak.

Pure code, no I/O: `EndHistory` remembers the log ends seen per partition, `age` combines
it with the timestamps into an `Age`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

__all__ = ["SKEW_S", "Age", "EndHistory", "age"]

K = TypeVar("K", bound=Hashable)

# Producers' clocks differ from ours and from each other's by this much and still count as
# telling the time; a stamp further off than that is no time at all.
SKEW_S = 60.0


class Age(NamedTuple):
    """The age of the oldest waiting record, in seconds."""

    low: float  # it is at least this old (0: no earlier look saw it)
    high: float  # it is at most this old (inf: nothing bounds it)
    # What `stream lag` shows: its timestamp's age where that fits the bounds, else the
    # least it can be by our own clock; None when neither is known.
    shown: float | None


def age(
    now: float,
    stamp_ms: int | None,
    *,
    before_ms: int | None = None,
    seen_at: float | None = None,
    absent_at: float | None = None,
) -> Age:
    """The age of a waiting record at `now` (wall-clock seconds).

    `stamp_ms`: its timestamp (None or negative: none); `before_ms`: its predecessor's;
    `seen_at`: when we first saw it in the log; `absent_at`: when we last saw the log end
    before it. Our own observations outrank any timestamp.
    """
    low = max(0.0, now - seen_at) if seen_at is not None else 0.0
    high = math.inf if absent_at is None else max(0.0, now - absent_at)
    before = _stamp_age(now, before_ms)
    if before is not None and before >= -SKEW_S:
        high = min(high, max(0.0, before))
    high = max(high, low)  # a predecessor stamped late cannot make a record younger than seen
    stamped = _stamp_age(now, stamp_ms)
    if stamped is not None and low - SKEW_S <= stamped <= high + SKEW_S:
        believed = min(max(stamped, low), high)
        return Age(believed, believed, believed)
    return Age(low, high, low if low > 0 else None)


def _stamp_age(now: float, stamp_ms: int | None) -> float | None:
    if stamp_ms is None or stamp_ms < 0:
        return None  # -1 is Kafka's "no timestamp"
    return now - stamp_ms / 1000


class EndHistory(Generic[K]):
    """The log end offsets seen per partition, by our own clock (`at`: wall-clock seconds).

    Keeps the last `size` distinct ends of each partition with the first and last time
    each was seen; what falls out only loosens the bounds, never falsifies them.
    """

    def __init__(self, size: int = 64) -> None:
        if size < 1:
            raise ValueError("a history holds at least one end")
        self.size = size
        # per key: [first seen, last seen, end], ends rising
        self._ends: dict[K, deque[list[float]]] = {}

    def add(self, key: K, at: float, end: int | None) -> None:
        if end is None:
            return
        ends = self._ends.setdefault(key, deque(maxlen=self.size))
        if ends and ends[-1][2] == end:
            ends[-1][1] = at
        elif ends and ends[-1][2] > end:
            ends.clear()  # the log was recreated (a deleted topic): what we saw is void
            ends.append([at, at, end])
        else:
            ends.append([at, at, end])

    def bounds(self, key: K, offset: int) -> tuple[float | None, float | None]:
        """(when the record at `offset` was first seen in the log, when the log end was last
        seen at or below it); None where no look tells."""
        absent_at = None
        for first, last, end in self._ends.get(key, ()):
            if end > offset:
                return first, absent_at
            absent_at = last
        return None, absent_at

    def retain(self, keys: set[K]) -> None:
        for key in set(self._ends) - keys:
            del self._ends[key]

    def __len__(self) -> int:
        return len(self._ends)
