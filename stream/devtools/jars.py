"""The pinned Apache Kafka jars, fetched with Maven once and cached.

`stream/data/kafka-pom.xml` pins the version; the jars are cached under `STREAM_CACHE_DIR`
(default `~/.cache/prediction-stream`) and run with the local Java by
`stream.devtools.broker`.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from pathlib import Path

from stream.errors import BrokerError

__all__ = ["KAFKA_VERSION", "POM", "cache_dir", "fetch_jars", "require"]

POM = Path(__file__).resolve().parent.parent / "data" / "kafka-pom.xml"
KAFKA_VERSION = re.search(r"<kafka.version>([^<]+)<", POM.read_text()).group(1)  # type: ignore[union-attr]


def cache_dir() -> Path:
    base = os.environ.get("STREAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prediction-stream"
    )
    return Path(base)


def require(tool: str, why: str) -> str:
    """The path of `tool` on PATH, or a `BrokerError` saying what to install."""
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(
            f"{tool} is not installed, and it is needed {why}: install it "
            "(Debian: apt-get install openjdk-17-jre-headless maven) or point "
            "KAFKA_BOOTSTRAP_SERVERS at a running Kafka cluster"
        )
    return path


def fetch_jars(*, quiet: bool = False) -> Path:
    """Return the folder of the pinned broker's jars, fetching them with Maven the first time."""
    libs = cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs"
    if (libs / ".complete").exists():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    # One fetch at a time (test workers start their brokers together): the others wait for
    # it and take its jars, rather than replace them under a broker that is reading them.
    with open(libs.parent / "fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (libs / ".complete").exists():
            return libs
        return _fetch(libs, quiet=quiet)


def _fetch(libs: Path, *, quiet: bool) -> Path:
    mvn = require("mvn", "once, to fetch the Kafka broker jars")
    if not quiet:
        print(f"fetching Apache Kafka {KAFKA_VERSION} jars with Maven (once)…", flush=True)
    staging = libs.with_name(f"libs.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise BrokerError(
            f"Maven could not fetch the Kafka {KAFKA_VERSION} jars (exit {done.returncode}): "
            + " | ".join(tail)
        )
    (staging / ".complete").write_text(KAFKA_VERSION)
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)  # atomic: a half-fetched folder is never taken for a whole one
    return libs
