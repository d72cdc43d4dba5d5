"""`stream bench --profile DIR --profiler cprofile`: each run's measured interval under
cProfile (DIR/<run>-<round>.prof, for `python -m pstats`), and where the worker's CPU goes
beyond the bare HTTP loop's, by package.

cProfile sees every Python call, so it counts calls exactly (py-spy's samples in a VM
gather at system calls); it also adds a fixed cost to each, so code of many small calls
looks dearer than it is: its figures rank the packages, they do not measure them.
"""

from __future__ import annotations

import pstats
from collections import Counter
from pathlib import Path

from stream.devtools.benchruns import PROFILE_ENV, PROFILER_ENV, RUN_ENV

__all__ = ["by_package", "comparison", "env", "said"]

# Loop turns spent waiting: not work, and the stream run waits longer (it runs longer).
_IDLE = "<method 'poll' of 'select.epoll' objects>"


def env(folder: Path | None, profiler: str, run: str) -> dict[str, str]:
    """What a run's process is told of the profile to take (nothing without a folder)."""
    if folder is None:
        return {}
    return {PROFILE_ENV: str(folder), PROFILER_ENV: profiler, RUN_ENV: run}


def said(folder: Path, profiler: str, requests: int) -> list[str]:
    """The bench's lines on its profiles."""
    if profiler == "cprofile":
        return [f"profiles (cProfile, for python -m pstats): {folder}"] + comparison(
            folder, requests
        )
    return [f"profiles (py-spy, collapsed stacks): {folder}"]


def by_package(path: Path) -> Counter[str]:
    """Own time (s) per package in one profile: a third-party package by its top-level
    name, ours by module (`stream/engine/flow.py`), the standard library's by module
    (`stdlib:asyncio`), built-ins by name (`<method 'get' of 'dict' objects>`)."""
    totals: Counter[str] = Counter()
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    for (file, _, function), (_, _, own, _, _) in stats.items():
        totals[_package(file, function)] += own
    totals.pop(_IDLE, None)
    return totals


def _package(file: str, function: str) -> str:
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/stream/" in file:
        return "stream/" + file.rsplit("/stream/", 1)[1]
    if "/lib/python3" in file:
        return "stdlib:" + file.split("/lib/python3", 1)[1].split("/", 2)[1].removesuffix(".py")
    return function  # a built-in, or code compiled at run time (the schema validators)


def comparison(folder: Path, requests: int, *, top: int = 12) -> list[str]:
    """Lines naming where the stream run's own time per request exceeds the bare HTTP
    loop's, by package, from the first round's profiles in `folder`."""
    stream, bare = folder / "stream-1.prof", folder / "bare_http-1.prof"
    if not (stream.exists() and bare.exists()):
        return []
    ours, theirs = by_package(stream), by_package(bare)
    extra = {name: ours[name] - theirs[name] for name in ours.keys() | theirs.keys()}
    total = sum(ours.values()) - sum(theirs.values())
    lines = [
        f"cProfile, round 1: stream {sum(ours.values()) / requests * 1e6:,.0f} µs per request "
        f"of own time against bare_http's {sum(theirs.values()) / requests * 1e6:,.0f} "
        f"(+{total / requests * 1e6:,.0f}); the most of the difference, by package:"
    ]
    for name, seconds in sorted(extra.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"  {seconds / requests * 1e6:+8.1f} µs  {name}")
    return lines
