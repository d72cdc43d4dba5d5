"""`pip install` gives a worker that starts, from any folder, with nothing but the wheel.

The sdist and then the wheel (built from the sdist, as pip builds one) are made from a copy
of the source; the wheel goes into a fresh virtualenv, its dependencies from a local
wheelhouse (fetched once per machine, then offline); and the installed `stream`, run from
a folder that is not the checkout, applies the topics it carries, serves the simulator,
and runs both stages end to end against the test broker: a request becomes a result, bad
bytes a dead letter, /healthz and /readyz answer (checked with the very command
docker-compose.yml's healthcheck runs), and SIGTERM drains and exits 0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
import yaml

from stream import __version__
from stream.config import Settings
from stream.devtools.broker import free_port
from stream.devtools.jars import cache_dir
from tests.kit import eventually
from tests.kit.requests import request
from tests.kit.workers import simulator_env, worker_round_trip

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "stream", "topics")
PACKAGED = (
    "stream/data/kafka-pom.xml",
    *(f"stream/data/topics/{p.name}" for p in sorted((ROOT / "topics").iterdir())),
)


def _run(*command: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def _build(tmp_path: Path) -> tuple[Path, Path]:
    """sdist, then the wheel from it, from a clean copy (no stale build/ folder)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source)
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    return sdist, wheel


def _wheelhouse(wheel: Path) -> Path:
    """The wheel's dependencies as wheels, fetched from the registry once per set of pins."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        pins = sorted(
            line
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        )
    key = hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]
    house = cache_dir() / "wheels" / key
    if not (house / ".complete").exists():
        staging = house.with_name(f"{key}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        _run(sys.executable, "-m", "pip", "download", "--quiet", "--dest", staging, wheel)
        (staging / wheel.name).unlink(missing_ok=True)
        (staging / ".complete").write_text("\n".join(pins))
        shutil.rmtree(house, ignore_errors=True)
        staging.rename(house)
    return house


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "--quiet")
    _run(*pip, "--no-index", "--find-links", _wheelhouse(wheel), wheel)
    return venv


def _installed_env(env: dict[str, str]) -> dict[str, str]:
    """The test's environment, minus anything that could lead back to the checkout."""
    keep = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**keep, "PYTHONDONTWRITEBYTECODE": "1"}


def test_the_sdist_and_wheel_carry_what_a_worker_needs(tmp_path: Path) -> None:
    sdist, wheel = _build(tmp_path)
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    with zipfile.ZipFile(wheel) as archive:
        packed = set(archive.namelist())
    for name in PACKAGED:
        assert name in names, f"sdist lacks {name}"
        assert name in packed, f"wheel lacks {name}"
    assert "topics/requests.toml" in names or "stream/data/topics/requests.toml" in names
    assert not any(name.startswith("tests/") for name in packed)


@pytest.mark.timeout(300)
async def test_the_installed_wheel_runs_a_worker_end_to_end(
    tmp_path: Path, env: dict[str, str], settings: Settings
) -> None:
    _, wheel = await anyio.to_thread.run_sync(_build, tmp_path)
    venv = await anyio.to_thread.run_sync(_fresh_venv, tmp_path, wheel)
    stream, python = venv / "bin" / "stream", venv / "bin" / "python"
    away = tmp_path / "elsewhere"  # not the checkout: nothing can come from there
    away.mkdir()
    base = _installed_env(env)
    bootstrap = base.pop("KAFKA_BOOTSTRAP_SERVERS")  # given on the command line instead

    probe = "import stream; print(stream.__file__, stream.__version__)"
    where = (await anyio.run_process([python, "-c", probe], cwd=away, env=base)).stdout.split()
    assert where[0].decode().startswith(str(venv)) and where[1].decode() == __version__

    applied = await anyio.run_process(
        [stream, "topics", "apply", "--bootstrap-server", bootstrap, "--json"],
        cwd=away,
        env=base,
    )
    report = orjson.loads(applied.stdout)
    assert report["applied"] == 5 and report["drift"] == []

    port, sim_port = free_port(), free_port()
    async with await anyio.open_process(
        [stream, "simulate", "--port", str(sim_port), "--latency", "0.05"],
        cwd=away,
        env=base,
    ) as simulator:
        assert simulator.stdout is not None
        assert b"listening" in await simulator.stdout.receive()
        sim = f"http://127.0.0.1:{sim_port}"
        worker_env = simulator_env(
            base,
            sim,
            STREAM_METRICS_PORT=str(port),
            STREAM_METRICS_HOST="127.0.0.1",
            STREAM_INSTANCE_ID="installed-worker-0",
        )
        log = tmp_path / "worker.log"

        async def healthy() -> None:
            await _check_health(python, away, worker_env, port)

        found, code = await worker_round_trip(
            [stream, "run", "all", "--bootstrap-server", bootstrap],
            worker_env,
            settings,
            [
                ("wheel-ok", request("wheel-ok", "deepseek-v3-0324-syn")),
                ("wheel-bad", b"\xff not json"),
            ],
            log=log,
            cwd=away,
            ready=healthy,
        )
        simulator.terminate()
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert found["wheel-ok"][1]["provider"] == "synthetic"
    assert found["wheel-bad"][1]["reason"] == "invalid_encoding"
    assert "allow a stop grace period of at least 160 s" in output  # 120 s drain + 40 s


async def _check_health(python: Path, cwd: Path, env: dict[str, str], port: int) -> None:
    """Ready on /readyz, then docker-compose.yml's healthcheck command passes against it
    (and fails against a port with nothing behind it)."""

    async def ready() -> bool:
        try:
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            return answer.status_code == 200
        except httpx.HTTPError:
            return False

    await eventually(ready, timeout_s=60)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    check = compose["services"]["primary"]["healthcheck"]["test"]
    assert check[:2] == ["CMD", "python"]
    healthcheck = [str(python), *check[2:]]
    passed = await anyio.run_process(healthcheck, cwd=cwd, env=env, check=False)
    assert passed.returncode == 0, passed.stderr.decode()[-500:]
    nobody = {**env, "STREAM_METRICS_PORT": str(free_port())}
    failed = await anyio.run_process(healthcheck, cwd=cwd, env=nobody, check=False)
    assert failed.returncode != 0
