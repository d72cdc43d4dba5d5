"""The runs of `stream bench`, each measured alone in its own process.

    stream      the real worker (Worker + PrimaryStage + Engine), STREAM_MAX_IN_FLIGHT = C
    naive       a plain aiokafka loop, one record at a time per partition: consume, call the
                provider (same stage, same client), produce and wait, commit
    passthrough the engine with a handler that answers at once: the Kafka ceiling
    bare_http   ProviderClient at concurrency C, no Kafka: the HTTP ceiling
    bare_aiohttp  bare aiohttp beside it, for reference

Kafka runs find their requests already published (a backlog) and stop once all are done;
the parent process reads the result timestamps. HTTP runs time each call themselves.
Every run reports its process's CPU and peak RSS, which is why each has its own process.
With STREAM_BENCH_PROFILE=DIR, py-spy samples the process over its measured interval
(cProfile with STREAM_BENCH_PROFILER=cprofile); profiling slows the run: its figures are
for where the time goes, not for speed.
"""

from __future__ import annotations

import cProfile
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream.catalog import Model, load_catalog
from stream.config import Settings
from stream.devtools.processes import end, parent_death_signal
from stream.engine.engine import Engine, Output
from stream.engine.partitions import Record
from stream.providers import ProviderClient
from stream.stages import PrimaryStage, Topics
from stream.worker import PRIMARY_GROUP, Worker, tune_gc

__all__ = [
    "BENCH_MODEL",
    "KAFKA_RUNS",
    "PROFILER_ENV",
    "PROFILE_ENV",
    "RUNS",
    "RUN_ENV",
    "check_profiler",
    "messages",
    "run",
]

# A model without reasoning or fallback: the simulator answers it plainly.
BENCH_MODEL = "deepseek-v3-0324-syn"
KAFKA_RUNS = ("stream", "naive", "passthrough")
RUNS = ("stream", "naive", "bare_http", "bare_aiohttp", "passthrough")
_POLL_S = 0.02
PROFILE_ENV = "STREAM_BENCH_PROFILE"  # a folder: profile each run into it
PROFILER_ENV = "STREAM_BENCH_PROFILER"  # py-spy (the default) or cprofile
RUN_ENV = "STREAM_BENCH_RUN"  # the run's name there

Figures = dict[str, Any]


def messages(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"bench question {index}: what is a partition?"}]


def _py_spy() -> str | None:
    """py-spy beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def check_profiler() -> None:
    if _py_spy() is None:
        from stream.errors import StreamError

        raise StreamError("--profile needs py-spy: pip install -e '.[dev]' (or py-spy)")


class _Profiler:
    """py-spy attached to this process, writing collapsed stacks when stopped (SIGINT);
    or, with the `cprofile` profiler, cProfile over this process's own calls."""

    def __init__(self) -> None:
        folder, py_spy = os.environ.get(PROFILE_ENV), _py_spy()
        self._process: subprocess.Popen[bytes] | None = None
        self._cprofile: tuple[cProfile.Profile, Path] | None = None
        run = os.environ.get(RUN_ENV, "run")
        if folder and os.environ.get(PROFILER_ENV) == "cprofile":
            profile = cProfile.Profile()
            self._cprofile = (profile, Path(folder) / f"{run}.prof")
            profile.enable()
            return
        if not folder or py_spy is None:
            return
        out = Path(folder) / f"{run}.txt"
        command = [py_spy, "record", "--native", "-f", "raw", "-o", str(out)]
        self._process = subprocess.Popen(
            [*command, "--pid", str(os.getpid())],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=parent_death_signal(),
        )

    def stop(self) -> None:
        if self._cprofile is not None:
            profile, out = self._cprofile
            profile.disable()
            profile.dump_stats(out)
        if self._process is not None:
            end(self._process, sig=signal.SIGINT, grace_s=60)


class _Clock:
    """Wall time, and this process's CPU, between `start` and `stop`."""

    def __init__(self) -> None:
        self.ready_at = self.done_at = 0.0
        self._cpu = 0.0
        self._profiler: _Profiler | None = None

    def start(self) -> None:
        self._profiler = _Profiler()
        self.ready_at, self._cpu = time.time(), time.process_time()

    def stop(self) -> None:
        self.done_at, self._cpu = time.time(), time.process_time() - self._cpu
        if self._profiler is not None:
            self._profiler.stop()

    def figures(self, requests: int) -> Figures:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "requests": requests,
            "ready_at": self.ready_at,
            "done_at": self.done_at,
            "cpu_s": round(self._cpu, 3),
            "cpu_total_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
        }


async def _until(done: Callable[[], bool]) -> None:
    # Polling a counter costs less than waking an event per record.
    while not done():  # noqa: ASYNC110
        await anyio.sleep(_POLL_S)


# -- stream: the real worker ---------------------------------------------------------------


async def _stream(settings: Settings, requests: int) -> Figures:
    worker = Worker(settings, ("primary",), own_process=True)  # as `stream run` makes it

    async def engine() -> Engine:
        await worker.started.wait()
        return worker.engines[0]

    return await _timed(worker.run, engine, worker.stop, requests)


async def _timed(
    run: Callable[[], Coroutine[Any, Any, None]],
    engine_of: Callable[[], Awaitable[Engine]],
    stop: Callable[[], None],
    requests: int,
) -> Figures:
    """Figures from the engine's first assignment until it has finished `requests`."""
    clock = _Clock()
    async with anyio.create_task_group() as group:
        group.start_soon(run)
        engine = await engine_of()
        await engine.ready.wait()
        clock.start()
        await _until(lambda: engine.records_done >= requests)
        clock.stop()
        stop()
    return clock.figures(requests)


# -- passthrough: the engine alone ---------------------------------------------------------


async def _passthrough(settings: Settings, requests: int) -> Figures:
    topics = Topics.of(settings)

    async def handler(record: Record) -> Sequence[Output]:
        return [Output(topics.results, record.value, key=record.key, follows=record.partition)]

    engine = Engine(
        settings=settings,
        name="passthrough",
        group_id=settings.group(PRIMARY_GROUP),
        topics=[topics.requests],
        handler=handler,
        on_error=lambda record, exc: [],
        output_topics=[topics.results],
    )

    async def itself() -> Engine:
        return engine

    return await _timed(engine.run, itself, engine.stop, requests)


# -- naive: what most people write first ---------------------------------------------------


async def _naive(settings: Settings, requests: int) -> Figures:
    topics, clock = Topics.of(settings), _Clock()
    options = settings.kafka.client_options()
    consumer = AIOKafkaConsumer(
        topics.requests,
        group_id=settings.group(PRIMARY_GROUP),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **options,
    )
    producer = AIOKafkaProducer(enable_idempotence=True, acks="all", **options)
    async with ProviderClient(settings.synthetic) as client:
        stage = PrimaryStage(settings, load_catalog(settings), {"synthetic": client})
        await producer.start()
        await consumer.start()
        try:
            await _until(lambda: bool(consumer.assignment()))
            clock.start()
            await _naive_loop(consumer, producer, stage, requests)
            clock.stop()
        finally:
            await consumer.stop()
            await producer.stop()
    return clock.figures(requests)


async def _naive_loop(
    consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, stage: PrimaryStage, requests: int
) -> None:
    done = 0

    async def one_partition(tp: TopicPartition, records: list[Record]) -> None:
        nonlocal done
        for record in records:
            for output in await stage.handle(record):
                await producer.send_and_wait(
                    output.topic, output.value, key=output.key, headers=list(output.headers)
                )
            await consumer.commit({tp: record.offset + 1})
            done += 1

    while done < requests:
        batch = await consumer.getmany(timeout_ms=100)
        async with anyio.create_task_group() as group:
            for tp, records in batch.items():
                group.start_soon(one_partition, tp, records)


# -- bare HTTP: no Kafka -------------------------------------------------------------------


async def drive(call: Callable[[int], Awaitable[None]], requests: int, concurrency: int) -> Any:
    """Run `requests` calls with `concurrency` in flight; per-call latencies from the start."""
    next_index, latencies, clock = 0, [], _Clock()

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            await call(index)
            latencies.append(time.time() - clock.ready_at)

    clock.start()
    async with anyio.create_task_group() as group:
        for _ in range(min(concurrency, requests)):
            group.start_soon(worker)
    clock.stop()
    return {**clock.figures(requests), "latencies_s": latencies}


def _model(settings: Settings) -> Model:
    model = load_catalog(settings).get(BENCH_MODEL)
    assert model is not None, f"{BENCH_MODEL} is a default catalog model"
    return model


async def _bare_http(settings: Settings, requests: int, concurrency: int) -> Figures:
    model = _model(settings)
    async with ProviderClient(settings.synthetic) as client:

        async def call(index: int) -> None:
            await client.complete(model, messages(index))

        figures: Figures = await drive(call, requests, concurrency)
    return figures


async def _bare_aiohttp(settings: Settings, requests: int, concurrency: int) -> Figures:
    provider, model = settings.synthetic, _model(settings)
    url = f"{provider.base_url}/chat/completions"
    headers = {
        "Authorization": f"Bearer {provider.api_key.reveal()}",
        "Content-Type": "application/json",
    }
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def call(index: int) -> None:
            body = orjson.dumps({"model": model.api_model, "messages": messages(index)})
            async with session.post(url, data=body) as response:
                data = orjson.loads(await response.read())
            if response.status != 200 or not data["choices"][0]["message"]["content"]:
                raise RuntimeError(f"bare aiohttp call failed: HTTP {response.status}")

        figures: Figures = await drive(call, requests, concurrency)
    return figures


async def run(mode: str, settings: Settings, requests: int) -> Figures:
    """Run one mode in this process and return its figures. Every run's process has the
    worker's garbage-collector settings (`tune_gc`), so the baselines' CPU per request is
    comparable with the worker's: what differs is what the worker does."""
    concurrency = settings.engine.max_in_flight
    tune_gc()
    if mode == "stream":
        return await _stream(settings, requests)
    if mode == "passthrough":
        return await _passthrough(settings, requests)
    if mode == "naive":
        return await _naive(settings, requests)
    if mode == "bare_http":
        return await _bare_http(settings, requests, concurrency)
    if mode == "bare_aiohttp":
        return await _bare_aiohttp(settings, requests, concurrency)
    raise ValueError(f"unknown bench run {mode!r}")
