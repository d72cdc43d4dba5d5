"""How much memory values hold while they are kept."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Sequence


def kept_bytes_each(make: Callable[[], Sequence[bytes]], rounds: int = 200) -> float:
    """Memory held per value, over `rounds` calls of `make` whose values are all kept."""
    kept: list[Sequence[bytes]] = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(rounds):
            kept.append(make())
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return held / sum(len(values) for values in kept)
