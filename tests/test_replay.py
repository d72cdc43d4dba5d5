from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from stream.backfill.progress import Progress, parse_rate
from stream.backfill.replay import PartitionReplay, Replay, ReplayOptions
from stream.backfill.replaycli import _runs
from stream.backfill.window import Span, parse_time
from stream.backfill.writer import _settled
from stream.config import Settings
from stream.errors import ConfigError
from tests.kit import run_cli
from tests.kit.kafka import Record, bad_key_batch, create_topics, produce, produce_batch, read_all
from tests.kit.kcat import kcat_produce, needs_kcat

pytestmark = pytest.mark.anyio

SOURCE, TARGET = "predictions.requests", "predictions.backfill"
BASE = (int(time.time()) - 3600) * 1000  # an hour ago, on a whole second
COUNT = 60  # record i: partition i % 3, timestamp BASE + i seconds
SINCE, UNTIL = BASE + 10_000, BASE + 40_000  # the window holds records 10..39


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _request(i: int) -> Record:
    value = orjson.dumps({"request_id": f"r{i}", "model": "m", "messages": [{"role": "user"}]})
    headers = [("request-id", f"r{i}".encode()), ("attempt", b"1")]
    return Record(value, f"k{i}".encode(), i % 3, BASE + i * 1000, headers)


async def _source(settings: Settings, *, target_partitions: int = 3) -> None:
    await create_topics(settings, {SOURCE: 3, TARGET: target_partitions})
    await produce(settings, settings.topic(SOURCE), [_request(i) for i in range(COUNT)])


def _options(settings: Settings, **changes: object) -> ReplayOptions:
    base: dict[str, object] = {
        "source": settings.topic(SOURCE),
        "target": settings.topic(TARGET),
        "since_ms": SINCE,
        "until_ms": UNTIL,
    }
    return ReplayOptions(**{**base, **changes})  # type: ignore[arg-type]


def _index(record: object) -> int:
    return int(orjson.loads(record.value)["request_id"][1:])  # type: ignore[attr-defined]


async def test_replay_copies_exactly_the_window_with_headers(
    settings: Settings, env: dict[str, str]
) -> None:
    await _source(settings)
    done = await run_cli(
        env, "replay", "--since", _rfc3339(SINCE), "--until", _rfc3339(UNTIL), "--source", SOURCE
    )
    assert done.returncode == 0, done.stderr
    assert "total" in done.stdout and "done" in done.stdout

    copies = await read_all(settings, settings.topic(TARGET))
    assert sorted(_index(r) for r in copies) == list(range(10, 40))
    originals = {
        (r.partition, r.offset): r for r in await read_all(settings, settings.topic(SOURCE))
    }
    for copy in copies:
        headers = dict(copy.headers)
        topic, partition, offset = headers["replayed-from"].decode().rsplit("/", 2)
        original = originals[(int(partition), int(offset))]
        assert topic == settings.topic(SOURCE)
        assert copy.partition == original.partition
        assert (copy.key, copy.value) == (original.key, original.value)
        assert headers["request-id"] == dict(original.headers)["request-id"]
        # stamped when copied, so retention and lag count from the copy
        assert copy.timestamp > original.timestamp


async def test_interrupted_replay_resumes_and_copies_each_record_once(settings: Settings) -> None:
    await _source(settings)
    first = Replay(settings=settings, options=_options(settings, limit=7))
    await first.run()
    assert first.copied == 7
    assert len(await read_all(settings, settings.topic(TARGET))) == 7

    second = Replay(settings=settings, options=_options(settings))
    await second.run()
    assert second.copied == 23
    assert sum(p.already for p in second.partitions) == 7

    third = Replay(settings=settings, options=_options(settings))
    await third.run()
    assert third.copied == 0
    copies = await read_all(settings, settings.topic(TARGET))
    assert sorted(_index(r) for r in copies) == list(range(10, 40))


async def test_records_stamped_ahead_are_copied_once_by_a_second_replay(
    settings: Settings,
) -> None:
    """Kafka takes records stamped up to an hour ahead (a producer whose clock runs fast).
    A replay from a time still to come copies them now; a second one must find those
    copies, written 50 minutes before the records' stamps (it looked back 15 minutes from
    its `since` and copied them all again)."""
    await create_topics(settings, {SOURCE: 3, TARGET: 3})
    ahead = int(time.time() * 1000) + 50 * 60_000
    records = [_request(i) for i in range(12)]
    stamped = [
        Record(r.value, r.key, r.partition, ahead + i, r.headers) for i, r in enumerate(records)
    ]
    await produce(settings, settings.topic(SOURCE), stamped)
    since = ahead - 20 * 60_000
    for expected in (12, 0):
        run = Replay(settings=settings, options=_options(settings, since_ms=since, until_ms=None))
        await run.run()
        assert run.copied == expected
    copies = await read_all(settings, settings.topic(TARGET))
    assert sorted(_index(r) for r in copies) == list(range(12))


async def test_killed_replay_resumes_and_copies_each_record_once(
    settings: Settings, env: dict[str, str]
) -> None:
    await _source(settings)
    window = ["--since", _rfc3339(SINCE), "--until", _rfc3339(UNTIL)]
    command = [sys.executable, "-m", "stream", "replay", *window]
    async with await anyio.open_process([*command, "--rate", "5"], env=env) as process:
        # wait for copies to be committed (a causal condition, not a sleep; copies read
        # uncommitted may still be in the open transaction the kill aborts), then kill it
        while len(await _committed(settings)) < 5:
            assert process.returncode is None
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
    landed = len(await _committed(settings))
    assert 5 <= landed < 30

    # its open transaction is aborted by the next run's start: what the workers read
    # (read_committed) holds each record once
    done = await run_cli(env, "replay", *window)
    assert done.returncode == 0, done.stderr
    copies = await _committed(settings)
    assert sorted(_index(r) for r in copies) == list(range(10, 40))


async def _committed(settings: Settings) -> list[object]:
    """The target's copies as the workers see them (read_committed)."""
    return await read_all(settings, settings.topic(TARGET), isolation="read_committed")


async def test_two_replays_at_once_never_copy_a_record_twice(
    settings: Settings, env: dict[str, str]
) -> None:
    await _source(settings)
    window = ["--since", _rfc3339(SINCE), "--until", _rfc3339(UNTIL), "--rate", "10"]
    done: list[subprocess.CompletedProcess[str]] = []

    async def replay() -> None:
        done.append(await run_cli(env, "replay", *window))

    async with anyio.create_task_group() as runs:
        runs.start_soon(replay)
        runs.start_soon(replay)
    copies = await _committed(settings)
    assert sorted(_index(r) for r in copies) == list(range(10, 40))
    # the later run fenced the earlier (unless that one had finished): one line, exit 1
    assert 0 in [run.returncode for run in done], [run.stderr for run in done]
    for run in done:
        if run.returncode != 0:
            assert run.returncode == 1, run.stderr
            assert run.stdout.strip().endswith(": failed")  # what it copied, it says
            assert "the same command again carries on" not in run.stderr  # the other runs
            (line,) = run.stderr.strip().splitlines()[-1:]
            assert (
                "fenced" in line
                and f"{settings.group('predictions-replay')}.{SOURCE}.{TARGET}" in line
            ), run.stderr
            assert "Traceback" not in run.stderr


async def test_an_interrupted_replay_reports_what_reached_the_target(
    settings: Settings, env: dict[str, str]
) -> None:
    await _source(settings)
    window = ["--since", _rfc3339(SINCE), "--until", _rfc3339(UNTIL)]
    # slow enough that the interrupt lands mid-run even when reading the copies back is slow
    command = [sys.executable, "-m", "stream", "replay", *window, "--rate", "2", "--json"]
    async with await anyio.open_process(command, env=env) as process:
        # copies have landed (a causal condition, not a sleep): interrupt it mid-run
        while len(await _committed(settings)) < 3:
            assert process.returncode is None
        process.send_signal(signal.SIGINT)
        assert process.stdout is not None
        out = b"".join([chunk async for chunk in process.stdout])
        assert await process.wait() == 130
    report = orjson.loads(out)
    assert report["outcome"] == "interrupted"
    copies = await _committed(settings)
    assert 3 <= len(copies) < 30
    assert report["total"]["copied"] == len(copies)
    for row in report["partitions"]:
        assert row["copied"] == len([c for c in copies if c.partition == row["partition"]])


async def test_dry_run_counts_per_partition_and_copies_nothing(
    settings: Settings, env: dict[str, str]
) -> None:
    await _source(settings)
    done = await run_cli(
        env, "replay", "--since", _rfc3339(SINCE), "--until", _rfc3339(UNTIL), "--dry-run"
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()}
    # records 10..39 round-robin over 3 partitions: 10 each
    for partition in ("0", "1", "2"):
        assert rows[partition][2:] == ["10", "0", "10"]
    assert rows["total"][1:] == ["30", "0", "30"]
    assert "nothing copied" in done.stdout
    assert await read_all(settings, settings.topic(TARGET)) == []


async def test_rate_limits_records_per_second(settings: Settings) -> None:
    await _source(settings)
    run = Replay(settings=settings, options=_options(settings, rate=20.0))
    started = time.monotonic()
    await run.run()
    # 30 records at 20/s: the last may go no sooner than 29/20 s after the first
    assert time.monotonic() - started >= 29 / 20
    assert run.copied == 30


async def test_fewer_target_partitions_wrap_and_still_resume(settings: Settings) -> None:
    await _source(settings, target_partitions=2)
    await Replay(settings=settings, options=_options(settings, limit=13)).run()
    again = Replay(settings=settings, options=_options(settings))
    await again.run()
    assert again.copied == 17
    copies = await read_all(settings, settings.topic(TARGET))
    assert sorted(_index(r) for r in copies) == list(range(10, 40))
    assert {r.partition for r in copies} == {0, 1}
    for copy in copies:
        source_partition = int(dict(copy.headers)["replayed-from"].decode().split("/")[-2])
        assert copy.partition == source_partition % 2


async def test_missing_topic_says_how_to_create_it(env: dict[str, str]) -> None:
    done = await run_cli(env, "replay", "--since", "1h")
    assert done.returncode == 1
    assert "does not exist" in done.stderr and "stream topics apply" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


async def test_until_before_since_is_one_line(env: dict[str, str]) -> None:
    done = await run_cli(env, "replay", "--since", "1h", "--until", "2h")
    assert done.returncode == 2  # a usage error
    assert "--until 2h is not after --since 1h" in done.stderr
    assert done.stderr.count("\n") == 1


@needs_kcat
async def test_records_the_client_cannot_decode_or_write_are_reported_not_fatal(
    settings: Settings, env: dict[str, str]
) -> None:
    await create_topics(settings, {SOURCE: 3, TARGET: 3})
    source = settings.topic(SOURCE)
    now = int(time.time() * 1000)
    await produce(
        settings, source, [Record(f"{i}".encode(), partition=1, timestamp_ms=now) for i in range(3)]
    )
    # one batch whose second record has a header key that is not UTF-8: the first is
    # read, nothing past the second can be (the third is good, and unreadable)
    batch = bad_key_batch([b"before", b"bad", b"after"], bad=1)
    await produce_batch(settings, TopicPartition(source, 1), batch)
    await kcat_produce(settings.kafka.bootstrap_servers, source, 0, [None])  # no key, no value
    await produce(
        settings,
        source,
        [Record(f"{p}{i}".encode(), partition=p, timestamp_ms=now) for p in (0, 1) for i in (7, 8)],
    )

    dry = await run_cli(env, "replay", "--since", "1h", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    said = "will not be copied, the Kafka client cannot decode them: partition 1 offsets 4-5\n"
    assert said in dry.stdout  # known before the run
    done = await run_cli(env, "replay", "--since", "1h")
    assert done.returncode == 0, done.stderr
    assert "not copied, the Kafka client cannot decode them: partition 1 offsets 4-5\n" in (
        done.stdout
    )
    assert "neither key nor value (the Kafka client cannot write that): partition 0 offsets 0" in (
        done.stdout
    )
    copies = sorted(r.value for r in await read_all(settings, settings.topic(TARGET)))
    assert copies == [b"0", b"07", b"08", b"1", b"17", b"18", b"2", b"before"]
    # what could not be copied was dealt with too: a finished run is at 100 %
    (last,) = [line for line in done.stderr.splitlines() if line.startswith("replay: ")][-1:]
    assert "(100%)" in last, done.stderr


@needs_kcat
async def test_a_target_header_that_names_no_record_is_ignored(
    settings: Settings, env: dict[str, str]
) -> None:
    await _source(settings)
    target, bootstrap = settings.topic(TARGET), settings.kafka.bootstrap_servers
    await kcat_produce(bootstrap, target, 0, [b"{}"], headers=[(b"replayed-from", None)])
    hostile = [b"", b"junk", b"t/1", "t/\u00b2/1".encode(), b"\xff/0/-1"]
    await produce(
        settings, target, [Record(b"{}", None, 1, None, [("replayed-from", h)]) for h in hostile]
    )
    window = ["--since", _rfc3339(SINCE), "--until", _rfc3339(UNTIL)]

    dry = await run_cli(env, "replay", *window, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-2].split()[1:] == ["30", "0", "30"]  # none is a copy
    done = await run_cli(env, "replay", *window)
    assert done.returncode == 0, done.stderr
    copies = await read_all(settings, target)
    assert sorted(_index(r) for r in copies if r.value != b"{}") == list(range(10, 40))


async def test_a_record_the_target_cannot_take_is_listed_and_the_partition_goes_on(
    settings: Settings, env: dict[str, str]
) -> None:
    # the largest record a topic takes: with the replayed-from header, its copy is larger
    await create_topics(settings, {SOURCE: 1, TARGET: 1}, {"max.message.bytes": "1048588"})
    now = int(time.time() * 1000)
    full = orjson.dumps({"request_id": "big", "pad": "x" * 1_048_487})
    assert len(full) == 1_048_516
    records = [Record(b"0", None, 0, now), Record(full, None, 0, now), Record(b"2", None, 0, now)]
    await produce(settings, settings.topic(SOURCE), records, max_request_size=2_000_000)

    for _ in range(2):  # and again: listed each time, never copied, nothing copied twice
        done = await run_cli(env, "replay", "--since", "1h")
        assert done.returncode == 0, done.stderr
        assert "not copied, larger than the target takes (1,048,6" in done.stdout
        assert "max.message.bytes 1,048,588): partition 0 offsets 1\n" in done.stdout
        copies = await read_all(settings, settings.topic(TARGET))
        assert [r.value for r in copies] == [b"0", b"2"]
        assert "(100%)" in [ln for ln in done.stderr.splitlines() if "replay: " in ln][-1]
    report = orjson.loads((await run_cli(env, "replay", "--since", "1h", "--json")).stdout)
    (row,) = report["not_copied"]
    assert (row["partition"], row["offset"]) == (0, 1)
    assert row["why"].startswith("larger than the target takes")


@pytest.mark.parametrize(
    ("option", "topic"),
    [
        ("--to", "predictions.dead-letter"),
        ("--to", "predictions.results"),
        ("--source", "predictions.results"),
        ("--source", "predictions.fallback"),
        ("--to", "no.such.topic"),
    ],
)
async def test_replay_moves_requests_only_between_request_topics(
    env: dict[str, str], option: str, topic: str
) -> None:
    done = await run_cli(env, "replay", "--since", "1h", option, topic)
    assert done.returncode == 1
    assert f"{option} {topic} is not a request topic" in done.stderr
    assert "(predictions.backfill, predictions.requests)" in done.stderr
    assert done.stderr.count("\n") == 1


def test_parse_time_reads_rfc3339_and_ages() -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    noon = int(now.timestamp() * 1000)
    assert parse_time("2025-06-01T12:00:00Z", option="--since") == noon
    assert parse_time("2025-06-01T14:00:00+02:00", option="--since") == noon
    assert parse_time("now", option="--since", now=now) == noon
    assert parse_time("90m", option="--since", now=now) == noon - 90 * 60_000
    assert parse_time("1h30m", option="--since", now=now) == noon - 90 * 60_000
    assert parse_time("1d", option="--since", now=now) == noon - 86_400_000
    for bad in ("yesterday", "2h ago", "2025-06-01T12:00:00", "-1h"):
        with pytest.raises(ConfigError):
            parse_time(bad, option="--since", now=now)


def test_parse_rate() -> None:
    assert parse_rate("200/s") == 200.0 and parse_rate("2.5") == 2.5 and parse_rate(None) is None
    assert parse_rate("0.02") == 0.02 and parse_rate("1000000/s") == 1e6
    for bad in ("0", "-3/s", "fast", "1e-300", "0.01", "inf", "nan", "2000000"):
        with pytest.raises(ConfigError):
            parse_rate(bad)


def test_copied_ranges_decide_where_to_start_and_what_to_skip() -> None:
    part = PartitionReplay(
        partition=0, window=Span(10, 50), done=[Span(0, 15), Span(20, 30), Span(60, 70)]
    )
    assert part.already == 15  # 10..14 and 20..29
    assert part.first_missing() == 15
    assert [o for o in range(10, 50) if not part.copied_before(o)] == [
        *range(15, 20),
        *range(30, 50),
    ]


async def test_json_summary_for_scripts(settings: Settings, env: dict[str, str]) -> None:
    await _source(settings)
    window = ["--since", _rfc3339(SINCE), "--until", _rfc3339(UNTIL), "--json"]
    dry = await run_cli(env, "replay", *window, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    report = orjson.loads(dry.stdout)
    assert (report["source"], report["target"]) == (settings.topic(SOURCE), settings.topic(TARGET))
    assert report["dry_run"] is True and report["outcome"] == "done"
    assert report["total"] == {"records": 30, "already": 0, "to_copy": 30, "copied": 0}
    assert sorted(row["partition"] for row in report["partitions"]) == [0, 1, 2]
    for row in report["partitions"]:
        assert row["window_end"] - row["window_start"] == row["records"] == 10

    real = orjson.loads((await run_cli(env, "replay", *window)).stdout)
    assert real["dry_run"] is False and real["total"]["copied"] == 30
    again = orjson.loads((await run_cli(env, "replay", *window)).stdout)
    assert again["total"] == {"records": 30, "already": 30, "to_copy": 0, "copied": 0}


async def _in_transactions(settings: Settings, topic: str) -> None:
    """30 requests in 10 committed transactions (each leaves a marker: an offset that is no
    record), over 2 partitions, then 2 in a transaction aborted (offsets, never records)."""
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), transactional_id=settings.topic("writer")
    )
    await producer.start()
    try:
        for t in range(11):
            await producer.begin_transaction()
            for i in range(3 * t, 3 * t + (3 if t < 10 else 2)):
                request = _request(i)
                await producer.send_and_wait(topic, request.value, request.key, t % 2)
            await (producer.commit_transaction() if t < 10 else producer.abort_transaction())
    finally:
        await producer.stop()


async def test_totals_count_records_not_the_offsets_transactions_take(
    settings: Settings, env: dict[str, str]
) -> None:
    """A source written in transactions (as `stream redrive` writes the requests topic):
    the totals counted offsets, so a complete run said done at 30/43 and every run after
    it had 13 "to copy" that it never copied."""
    await create_topics(settings, {SOURCE: 2, TARGET: 2})
    await _in_transactions(settings, settings.topic(SOURCE))
    window = ["--since", "1h", "--json"]

    def totals(run: subprocess.CompletedProcess[str]) -> list[int]:
        assert run.returncode == 0, run.stderr
        total = orjson.loads(run.stdout)["total"]
        return [total[key] for key in ("records", "already", "to_copy", "copied")]

    assert totals(await run_cli(env, "replay", *window, "--dry-run")) == [30, 0, 30, 0]
    done = await run_cli(env, "replay", *window)
    assert totals(done) == [30, 0, 30, 30]
    assert "replay: 30/30 records (100%)" in done.stderr
    rows = orjson.loads(done.stdout)["partitions"]
    assert [row["records"] for row in rows] == [15, 15]
    # the windows' offsets: 15 records and 5 markers each, and 2 aborted + a marker on 0
    assert [row["window_end"] for row in rows] == [23, 20]
    assert totals(await run_cli(env, "replay", *window)) == [30, 30, 0, 0]
    assert sorted(_index(r) for r in await _committed(settings)) == list(range(30))


async def test_a_run_that_stops_moving_says_it_waits_and_one_that_moves_says_nothing() -> None:
    """A broker gone mid-run: Kafka's clients wait and retry, and the run carries on when
    they get through; the person watching is told why the progress line stopped."""
    stalled = io.StringIO()
    with Progress("replay", 10, out=stalled, stall_s=0.2) as progress:
        progress.advance(2)
        await anyio.sleep(0.6)  # nothing done for three times stall_s
    assert "replay: nothing done for" in stalled.getvalue()
    assert "(is Kafka reachable?): waiting; Ctrl-C stops" in stalled.getvalue()

    moving = io.StringIO()
    with Progress("replay", 100, out=moving, stall_s=1.0) as progress:
        for _ in range(30):
            progress.advance(1)
            await anyio.sleep(0.05)
    assert "nothing done" not in moving.getvalue()

    finished = io.StringIO()
    with Progress("replay", 3, out=finished, stall_s=0.1) as progress:
        progress.advance(3)
        await anyio.sleep(0.3)  # all done: waiting on nothing
    assert "nothing done" not in finished.getvalue()


async def test_a_transaction_kafka_let_expire_says_so_not_that_another_run_took_over(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kafka aborts a transaction left open past its timeout (a broker paused 25 s under a
    replay) and fences its producer: the run then said another run had taken over, and the
    operator went looking for one. It says Kafka stopped answering, and how to carry on."""
    from stream.backfill import writer
    from stream.errors import FencedError, KafkaError

    monkeypatch.setattr(writer, "TRANSACTION_TIMEOUT_MS", 1000)
    await create_topics(settings, {TARGET: 1})
    fenced: BaseException | None = None
    async with writer.exclusive_producer(
        settings, transactional_id=settings.topic("expiring"), doing="starting"
    ) as producer:
        try:
            with anyio.fail_after(60):
                async with writer.transaction(producer, on_commit=lambda: None) as txn:
                    await (await txn.send(settings.topic(TARGET), b"late"))
                    while True:  # Kafka's sweep of expired transactions runs every 10 s
                        await anyio.sleep(1)
                        await (await txn.send(settings.topic(TARGET), b"later"))
        except Exception as exc:
            fenced = exc
    assert isinstance(fenced, writer.Expired), repr(fenced)
    error = writer.taken_over("replay", "id", "target", fenced)
    assert isinstance(error, KafkaError) and not isinstance(error, FencedError)
    assert "did not answer this `stream replay` for over 1 s" in str(error)
    assert "run the same command again" in str(error)
    # a fence straight after the start is another run's: said as before
    assert isinstance(writer.taken_over("replay", "id", "target", None), FencedError)


@given(st.sets(st.integers(min_value=0, max_value=60)))
def test_offsets_not_copied_are_listed_as_runs(offsets: set[int]) -> None:
    parts = listed.split(", ") if (listed := _runs(list(offsets))) else []
    back: list[int] = []
    for part in parts:
        first, _, last = part.partition("-")
        back += range(int(first), int(last or first) + 1)
    assert back == sorted(offsets)  # each once, in order
    assert len(parts) == len([o for o in offsets if o - 1 not in offsets])  # one per run


@pytest.mark.parametrize("fails", [False, True])
async def test_a_commit_under_way_at_ctrl_c_is_counted_if_and_only_if_it_lands(
    fails: bool,
) -> None:
    """Ctrl-C cancels the run's scope, which keeps cancelling (`stream.interrupts`): the
    wait for the commit's answer must not be cancelled with it (it was: a commit that
    landed went uncounted, and an interrupted run said it copied a batch less)."""
    counted: list[int] = []

    async def commit() -> None:  # Kafka answering the commit 0.3 s later
        await anyio.sleep(0.3)
        if fails:
            raise RuntimeError("Kafka refused it")

    with anyio.CancelScope() as scope:
        asyncio.get_running_loop().call_later(0.1, scope.cancel)  # Ctrl-C meanwhile
        await _settled(commit(), lambda: counted.append(1))
    assert scope.cancelled_caught
    assert counted == ([] if fails else [1])
