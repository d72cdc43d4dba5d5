"""A hostile upstream that is not Python: kcat writing raw bytes to the real broker.

kcat (librdkafka) writes what no Python client will: header keys that are not UTF-8, and
records with neither key nor value. Values go from files (any bytes travel as they are),
except null and empty ones, which kcat only writes from input lines (`-K` splits key and
value, `-Z` makes empty ones null). Keys and header values go through argv or a line, so
they cannot hold a NUL byte (nor a tab or newline in line mode).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

__all__ = ["kcat_produce", "needs_kcat"]

needs_kcat = pytest.mark.skipif(
    shutil.which("kcat") is None, reason="kcat is not installed (`./dev test` installs it)"
)

Header = tuple[bytes, bytes | None]


async def kcat_produce(
    bootstrap: str,
    topic: str,
    partition: int,
    values: Sequence[bytes | None],
    *,
    key: bytes | None = None,
    headers: Sequence[Header] = (),
    compression: str | None = None,
) -> None:
    """Write `values` to one partition in one kcat run (one batch, as far as librdkafka
    batches), each with the same key and headers; a header value None is a null value.
    `compression`: the batch's codec (gzip, snappy, lz4, zstd), as librdkafka writes it."""
    args: list[str | bytes] = ["kcat", "-b", bootstrap, "-P", "-t", topic, "-p", str(partition)]
    if compression is not None:
        args += ["-z", compression]
    for name, value in headers:
        args += ["-H", name if value is None else name + b"=" + value]
    if all(values):
        if key is not None:
            args += ["-k", key]
        with tempfile.TemporaryDirectory() as folder:
            for i, value in enumerate(values):
                path = Path(folder) / f"{i:05d}"
                path.write_bytes(value or b"")
                args.append(str(path))
            await anyio.run_process(args, check=True)
        return
    # kcat skips empty files: null and empty values go as lines, "key<TAB>value"
    if any(b"\t" in v or b"\n" in v for v in [key or b"", *(v or b"" for v in values)]):
        raise ValueError("in line mode kcat cannot write a tab or newline")
    if None in values:
        if b"" in values:
            raise ValueError("kcat writes an empty value as null with -Z: not both in one run")
        args.append("-Z")  # an empty key or value is null (so a key b"" becomes null too)
    lines = b"".join((key or b"") + b"\t" + (v or b"") + b"\n" for v in values)
    await anyio.run_process([*args, "-K", "\t"], input=lines, check=True)
