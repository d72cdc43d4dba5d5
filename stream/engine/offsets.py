"""Which offsets of one partition are finished, and what may be committed.

Records of a partition finish out of order, but Kafka stores one committed offset per
partition. `PartitionOffsets` commits the *watermark* (every record below it is finished)
and carries the finished offsets above it in the commit metadata, so whoever reads the
partition next (a restart, or the new owner after a rebalance) skips them and re-runs only
what was really unfinished.

Offsets are not assumed contiguous: transaction markers and compaction leave gaps, so the
tracker only ever reasons about offsets it has *seen*. Between the watermark and the highest
offset seen, every offset is either seen-and-tracked or a gap nobody will deliver.

Metadata format (`encode_metadata`): base64url (no padding) of
`version byte, varint(watermark), then pairs varint(gap), varint(run length)` describing
runs of finished offsets above the watermark. It must fit Kafka's default
`offset.metadata.max.bytes` (4096); when it would not, only a prefix of the runs is written:
that re-runs some finished records later, and never claims an unfinished one finished.

Notes (`with_notes`, `split_notes`): short `~key=value` pairs after the encoded offsets,
outside the base64url alphabet, so a reader that knows none of them still decodes the
offsets. The engine writes `started` (one past the highest offset it ever started: a next
owner re-delivering below it may be paying for a call again) and `held` (why a gate holds
the partition: `stream lag` shows it).
"""

from __future__ import annotations

import base64
import binascii
import re
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Sequence

__all__ = [
    "METADATA_MAX_CHARS",
    "PartitionOffsets",
    "decode_metadata",
    "encode_metadata",
    "note_number",
    "split_notes",
    "with_notes",
]

_VERSION = 1
# Kafka's offset.metadata.max.bytes defaults to 4096; stay a little below it.
METADATA_MAX_CHARS = 4000


def _varint(value: int, out: bytearray) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _runs(watermark: int, finished: Iterable[int]) -> list[tuple[int, int]]:
    """(gap from the end of the previous run, length) for each run of sorted offsets."""
    runs: list[tuple[int, int]] = []
    cursor = watermark  # first offset not yet described
    start = previous = None
    for offset in finished:
        if previous is not None and offset == previous + 1:
            previous = offset
            continue
        if start is not None and previous is not None:
            runs.append((start - cursor, previous - start + 1))
            cursor = previous + 1
        start = previous = offset
    if start is not None and previous is not None:
        runs.append((start - cursor, previous - start + 1))
    return runs


def encode_metadata(
    watermark: int, finished: Iterable[int], max_chars: int = METADATA_MAX_CHARS
) -> str:
    """Commit metadata for sorted finished offsets above `watermark` (prefix if too long)."""
    out = bytearray([_VERSION])
    _varint(watermark, out)
    max_bytes = max_chars * 3 // 4  # base64 turns 3 bytes into 4 characters
    if len(out) > max_bytes:
        return ""
    for gap, length in _runs(watermark, finished):
        pair = bytearray()
        _varint(gap, pair)
        _varint(length, pair)
        if len(out) + len(pair) > max_bytes:
            break  # a prefix: later finished records will merely be re-run
        out += pair
    return base64.urlsafe_b64encode(bytes(out)).decode().rstrip("=")


_NOTE = "~"
_NOTE_TEXT = re.compile(r"[^A-Za-z0-9_.:-]")
_MAX_NOTE_CHARS = 64


def with_notes(metadata: str, notes: dict[str, str]) -> str:
    """`metadata` followed by `~key=value` notes (cleaned to a safe alphabet, and short)."""
    parts = [
        f"{_NOTE}{_NOTE_TEXT.sub('_', key)[:16]}={_NOTE_TEXT.sub('_', value)[:_MAX_NOTE_CHARS]}"
        for key, value in sorted(notes.items())
    ]
    return metadata + "".join(parts)


def split_notes(metadata: str | None) -> tuple[str, dict[str, str]]:
    """(the offsets part, the notes) of commit metadata; no notes for anything unexpected."""
    if not metadata:
        return "", {}
    head, *tail = metadata.split(_NOTE)
    notes = {}
    for item in tail:
        key, sep, value = item.partition("=")
        if sep and key:
            notes[key] = value
    return head, notes


def note_number(notes: dict[str, str], key: str) -> int | None:
    """A note's value as a number (an offset, epoch milliseconds), or None when it is not
    one: metadata is anyone's to write (any client the group lets commit), and neither
    "²" (which `str.isdigit` takes) nor a number past Kafka's 64 bits may stop a worker."""
    value = notes.get(key, "")
    if 0 < len(value) <= 18 and value.isascii() and value.isdigit():
        return int(value)
    return None


# Far above what a partition's window can have finished beyond its watermark; bounds the
# memory a crafted metadata string can make us allocate.
_MAX_DECODED = 1_000_000


def decode_metadata(metadata: str | None, committed: int) -> list[int]:
    """Finished offsets above `committed` from commit metadata; [] for anything unexpected.

    Metadata written for another watermark (an operator reset the offset, another tool
    committed) or that is not ours is ignored: re-running is safe, skipping is not.
    """
    metadata, _ = split_notes(metadata)
    if not metadata:
        return []
    try:
        data = base64.urlsafe_b64decode(metadata + "=" * (-len(metadata) % 4))
        if not data or data[0] != _VERSION:
            return []
        watermark, pos = _read_varint(data, 1)
        if watermark != committed:
            return []
        finished: list[int] = []
        cursor = watermark
        while pos < len(data):
            gap, pos = _read_varint(data, pos)
            length, pos = _read_varint(data, pos)
            if length < 1 or len(finished) + length > _MAX_DECODED:
                return []  # not something we wrote: a window never holds that many
            start = cursor + gap
            finished.extend(range(start, start + length))
            cursor = start + length
        return finished
    except (ValueError, binascii.Error):
        return []


class PartitionOffsets:
    """Offsets of one partition from the moment a record is accepted until it is finished.

    `accept` every fetched record in offset order; it answers False for a record already
    finished (below the watermark or named in the metadata read at assignment), which
    must then be skipped. `finish` it once its outputs are safely written. `watermark`
    and `metadata()` are what to commit.
    """

    __slots__ = ("_done", "_high", "_restored", "_restored_from", "_seen", "_watermark")

    def __init__(self, committed: int, finished_above: Sequence[int] = ()) -> None:
        self._watermark = committed
        self._high = committed  # one past the highest offset seen
        self._seen: deque[int] = deque()  # accepted offsets above the watermark, in order
        self._done: set[int] = set()  # the finished ones among `_seen`
        # finished per the metadata, not delivered again yet (from `_restored_from` on: a
        # sorted list, so `finished` is a binary search, not a scan); always above `_high`
        self._restored = sorted(o for o in set(finished_above) if o >= committed)
        self._restored_from = 0

    @property
    def watermark(self) -> int:
        """Every record below this offset is finished: the offset to commit."""
        return self._watermark

    @property
    def next_expected(self) -> int | None:
        """The offset the next fetched record should have at the least: one past the highest
        seen, or the committed offset; None before the first record of a partition that
        has no committed offset."""
        return self._high if self._high >= 0 else None

    @property
    def pending(self) -> int:
        """Accepted records not finished yet (in flight or waiting to start)."""
        return len(self._seen) - len(self._done)

    @property
    def finished_uncommitted(self) -> int:
        """Finished records above the watermark (carried in the metadata)."""
        return len(self._done) + len(self._restored) - self._restored_from

    @property
    def span(self) -> int:
        """Tracked offsets above the watermark: what this tracker holds in memory."""
        return len(self._seen)

    def accept(self, offset: int) -> bool:
        """Track a fetched record; False if it is already finished and must be skipped."""
        if offset < self._high:
            return False  # re-delivered (a seek back): already tracked or finished
        self._high = offset + 1
        if self._restored_from < len(self._restored) and self._restored_from_next(offset):
            self._seen.append(offset)
            self._done.add(offset)
            self._advance()
            return False
        self._seen.append(offset)
        self._advance()
        return True

    def finished(self, offset: int) -> bool:
        """Whether `offset` is known to be finished."""
        if offset < self._watermark or offset in self._done:
            return True
        restored, start = self._restored, self._restored_from
        at = bisect_left(restored, offset, start)
        return at < len(restored) and restored[at] == offset

    def _restored_from_next(self, offset: int) -> bool:
        """Step past the restored offsets below `offset` (gaps: never delivered); whether
        `offset` itself is one."""
        restored = self._restored
        start = bisect_left(restored, offset, self._restored_from)
        found = start < len(restored) and restored[start] == offset
        self._restored_from = start + found
        if self._restored_from == len(restored):
            self._restored, self._restored_from = [], 0  # all delivered: let the list go
        return found

    def finish(self, offset: int) -> None:
        """Mark an accepted record finished."""
        if offset < self._watermark or offset >= self._high or offset in self._done:
            return  # never accepted, or finished already: nothing to change
        self._done.add(offset)
        self._advance()

    def finished_above(self) -> list[int]:
        """Sorted finished offsets above the watermark."""
        return sorted(self._done) + self._restored[self._restored_from :]

    def metadata(self, max_chars: int = METADATA_MAX_CHARS) -> str:
        return encode_metadata(self._watermark, self.finished_above(), max_chars)

    def _advance(self) -> None:
        seen, done = self._seen, self._done
        while seen and seen[0] in done:
            done.discard(seen.popleft())
        # With nothing pending the watermark is one past the highest offset seen, which may
        # be a gap (a transaction marker): committing it is what Kafka itself would do.
        self._watermark = seen[0] if seen else max(self._high, self._watermark)
