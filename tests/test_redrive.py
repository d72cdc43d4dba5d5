from __future__ import annotations

import base64
import time
from typing import Any

import anyio
import jsonschema
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream import topics
from stream.backfill.redrive import GROUP, REASONS, REDRIVEN_FROM, Redrive, RedriveOptions
from stream.cli import build_parser
from stream.config import Settings
from stream.errors import FencedError
from stream.records import Decoder
from tests.kit import run_cli
from tests.kit.kafka import Record, create_topic, create_topics, produce, read_all

pytestmark = pytest.mark.anyio

DEAD, REQUESTS, BACKFILL = "predictions.dead-letter", "predictions.requests", "predictions.backfill"
BASE = (int(time.time()) - 3600) * 1000
# (reason, has a parsed request, attempt header): letter i gets LETTERS[i % len]
LETTERS = [
    ("fallback_failed", True, b"1"),
    ("expired", True, None),
    ("unknown_model", True, b"3"),
    ("invalid_json", False, None),
    ("handler_error", False, b"1"),
    ("no_fallback", True, b"2"),
]
COUNT = 24  # four of each
RUNNABLE = {"fallback_failed", "expired", "no_fallback"}  # re-driven by default


def _schema(name: str) -> dict[str, Any]:
    (spec,) = [s for s in topics.load_specs(Settings().topics_dir) if s.name == name]
    return topics.load_schema(spec)


def _letter(i: int) -> Record:
    reason, parsed, attempt = LETTERS[i % len(LETTERS)]
    request = {
        "request_id": f"r{i}",
        "model": "deepseek-r1-0528-syn",
        "messages": [{"role": "user", "content": "hi"}],
    }
    value = {
        "reason": reason,
        "error": "it failed",
        "stage": "fallback",
        "request_id": f"r{i}" if parsed else None,
        "request": request if parsed else None,
        "raw": None if parsed else base64.b64encode(b"{not json").decode(),
        "source": {"topic": REQUESTS, "partition": 0, "offset": i, "timestamp": BASE},
        "failures": [],
        "dead_at": "2025-06-01T12:00:00Z",
    }
    headers = [
        ("request-id", f"r{i}".encode()),
        ("traceparent", f"00-{i + 1:032x}-{i + 1:016x}-01".encode()),  # W3C: never all zeros
    ]
    if attempt is not None:
        headers.append(("attempt", attempt))
    key = f"k{i}".encode() if i % 2 else None  # some keyless: the request_id stands in
    return Record(orjson.dumps(value), key, i % 3, BASE + i * 1000, headers)


async def _dead_letters(settings: Settings) -> list[Record]:
    await create_topics(settings, {DEAD: 3, REQUESTS: 3, BACKFILL: 3})
    letters = [_letter(i) for i in range(COUNT)]
    validate = jsonschema.Draft7Validator(_schema(DEAD)).validate
    for letter in letters:
        validate(orjson.loads(letter.value))  # the test input honours the contract
    await produce(settings, settings.topic(DEAD), letters)
    return letters


def _eligible(reasons: set[str], *, force: bool = False) -> list[int]:
    return [
        i
        for i in range(COUNT)
        if LETTERS[i % len(LETTERS)][0] in reasons
        and LETTERS[i % len(LETTERS)][1]
        and (force or LETTERS[i % len(LETTERS)][0] != "unknown_model")
    ]


def _ids(records: list[Any]) -> list[int]:
    return sorted(int(orjson.loads(r.value)["request_id"][1:]) for r in records)


def _options(settings: Settings, **changes: Any) -> RedriveOptions:
    base = {
        "source": settings.topic(DEAD),
        "target": settings.topic(REQUESTS),
        "group": settings.group(GROUP),
    }
    return RedriveOptions(**{**base, **changes})


async def test_redrive_sends_eligible_letters_once_with_attempt_incremented(
    settings: Settings, env: dict[str, str]
) -> None:
    letters = await _dead_letters(settings)
    done = await run_cli(env, "redrive")
    assert done.returncode == 0, done.stderr
    sent = await read_all(settings, settings.topic(REQUESTS))
    assert _ids(sent) == _eligible({"fallback_failed", "expired", "no_fallback"})

    validate = jsonschema.Draft7Validator(_schema(REQUESTS)).validate
    for record in sent:
        headers = dict(record.headers)
        topic, partition, offset = headers["redriven-from"].decode().rsplit("/", 2)
        assert topic == settings.topic(DEAD)
        i = int(orjson.loads(record.value)["request_id"][1:])
        key, value, old = letters[i].key, letters[i].value, letters[i].headers
        assert int(partition) == i % 3
        assert orjson.loads(record.value) == orjson.loads(value)["request"]
        validate(orjson.loads(record.value))
        assert record.key == (key or f"r{i}".encode())
        assert headers["attempt"] == str(int(dict(old).get("attempt", b"1")) + 1).encode()
        assert headers["traceparent"] == dict(old)["traceparent"]
        assert headers["request-id"] == f"r{i}".encode()
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    # redriven, already, cannot succeed, no request, max attempts, not selected, cannot send
    assert rows["unknown_model"] == ["0", "0", "4", "0", "0", "0", "0"]
    assert rows["invalid_json"] == ["0", "0", "4", "0", "0", "0", "0"]
    assert rows["handler_error"] == ["0", "0", "0", "4", "0", "0", "0"]
    assert rows["total"][:2] == ["12", "0"]

    again = await run_cli(env, "redrive")
    assert again.returncode == 0, again.stderr
    assert len(await read_all(settings, settings.topic(REQUESTS))) == len(sent)
    rows = {line.split()[0]: line.split()[1:] for line in again.stdout.splitlines()}
    assert rows["total"][:2] == ["0", "12"]  # what the first run sent, said so
    assert rows["expired"] == ["0", "4", "0", "0", "0", "0", "0"]


def _fallback_failed(i: int, **request: Any) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(_letter(0).value)
    value["request_id"] = value["request"]["request_id"] = f"r{i}"
    value["request"].update(request)
    return value


async def test_a_letter_that_cannot_be_sent_is_listed_and_the_run_goes_on(
    settings: Settings, env: dict[str, str]
) -> None:
    await create_topic(settings, DEAD, 1, {"max.message.bytes": "2097152"})
    await create_topics(settings, {REQUESTS: 1, BACKFILL: 1}, {"max.message.bytes": "1048588"})
    # nested deeper than JSON can be written back; over what the requests topic takes
    deep = orjson.dumps(_fallback_failed(1, metadata="DEEP"))
    deep = deep.replace(b'"DEEP"', b'{"a":' * 300 + b"1" + b"}" * 300)
    big = orjson.dumps(_fallback_failed(3, messages=[{"role": "user", "content": "x" * 1_500_000}]))
    values = [orjson.dumps(_fallback_failed(i)) for i in (0, 2, 4)]
    # orjson reads an integer beyond 64 bits as a float: it would go out changed
    wide = orjson.dumps(_fallback_failed(5, metadata={"order": "WIDE"}))
    wide = wide.replace(b'"WIDE"', b"123456789012345678901")
    letters = [values[0], deep, values[1], big, values[2], wide]
    await produce(
        settings,
        settings.topic(DEAD),
        [Record(v, partition=0) for v in letters],
        max_request_size=3_000_000,
    )
    listed = [
        "not re-driven (fallback_failed), its request cannot be written as JSON "
        "(Recursion limit reached): partition 0 offset 1",
        "not re-driven (fallback_failed), larger than the target takes (1,500,",
        "max.message.bytes 1,048,588): partition 0 offset 3",
        "not re-driven (fallback_failed), it holds an integer beyond 64 bits, which would be "
        "sent as a float: partition 0 offset 5",
    ]

    # a dry run, the run, and a run again: (redriven, already redriven) each time
    for args, counts in ((["--dry-run"], ["3", "0"]), ([], ["3", "0"]), ([], ["0", "3"])):
        done = await run_cli(env, "redrive", *args)
        assert done.returncode == 0, done.stderr
        for line in listed:
            assert line in done.stdout
        rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
        # then cannot succeed, no request, max attempts, not selected, cannot send
        assert rows["total"] == [*counts, "0", "0", "0", "0", "3"]
        sent = await read_all(settings, settings.topic(REQUESTS))
        assert _ids(sent) == ([] if args else [0, 2, 4])  # each once, whatever ran before
    report = orjson.loads((await run_cli(env, "redrive", "--json")).stdout)
    assert [(row["offset"], row["reason"]) for row in report["not_sent"]] == [
        (1, "fallback_failed"),
        (3, "fallback_failed"),
        (5, "fallback_failed"),
    ]


class _Killed(Exception):
    """The process died here."""


async def test_a_run_killed_before_its_transaction_commits_sends_nothing_twice(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _dead_letters(settings)

    async def killed(self: AIOKafkaProducer, *args: Any) -> None:
        raise _Killed  # the first batch is sent and acknowledged, not committed

    async def nothing(self: AIOKafkaProducer) -> None:
        return None  # a killed process aborts nothing: its transaction stays open

    monkeypatch.setattr(AIOKafkaProducer, "send_offsets_to_transaction", killed)
    monkeypatch.setattr(AIOKafkaProducer, "abort_transaction", nothing)
    first = Redrive(settings=settings, options=_options(settings))
    with pytest.raises(_Killed):
        await first.run()
    assert first.total("redriven") == 0
    assert len(await read_all(settings, settings.topic(REQUESTS))) == 4  # in the log

    monkeypatch.undo()
    dry = Redrive(settings=settings, options=_options(settings, dry_run=True))
    await dry.run()
    again = Redrive(settings=settings, options=_options(settings))
    await again.run()  # its start aborts the open transaction
    for run in (dry, again):
        assert run.total("already redriven") == 0
        assert run.total("redriven") == 12
    assert _ids(await _committed(settings)) == _eligible(
        {"fallback_failed", "expired", "no_fallback"}
    )


async def test_a_send_mark_left_by_a_run_before_transactions_is_honoured(
    settings: Settings,
) -> None:
    await _dead_letters(settings)
    # such a run sent partition 0's letters (offsets 0, 2, 4, 6: fallback_failed) and died
    # before its commit cleared the mark it had made
    dead, requests = settings.topic(DEAD), settings.topic(REQUESTS)
    sent = [
        Record(orjson.dumps({"request_id": f"r{i}"}), None, 0, None, [(REDRIVEN_FROM, origin)])
        for i in (0, 6, 12, 18)
        if (origin := f"{dead}/0/{i // 3}".encode())
    ]
    await produce(settings, requests, sent)
    mark = {"@sending": {"at": int(time.time() * 1000) - 60_000, "to": requests}}
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(), group_id=settings.group(GROUP), enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(dead, 0)])
        await consumer.commit({TopicPartition(dead, 0): (0, orjson.dumps(mark).decode())})
    finally:
        await consumer.stop()

    run = Redrive(settings=settings, options=_options(settings))
    await run.run()
    assert run.total("already redriven") == 4
    assert run.total("redriven") == 8


async def _commit_mark(settings: Settings, partition: int, mark: Any) -> None:
    tp = TopicPartition(settings.topic(DEAD), partition)
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(), group_id=settings.group(GROUP), enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: (0, orjson.dumps({"@sending": mark}).decode())})
    finally:
        await consumer.stop()


@pytest.mark.parametrize(
    "mark",
    [
        {"at": 2**64 - 1, "to": "predictions.requests"},  # past what Kafka can look up
        {"at": -5, "to": "predictions.requests"},
        {"at": 0, "to": "no-such-topic"},  # names a topic that is not there
        {"at": 0, "to": "not a topic/"},
        {"at": "0", "to": 7},
    ],
)
async def test_a_forged_send_mark_never_stops_a_redrive(settings: Settings, mark: Any) -> None:
    """The group's metadata is any committer's to write: a mark Kafka cannot look up, or
    one naming a missing topic, is passed over, not a failure of every later run."""
    await _dead_letters(settings)
    if isinstance(mark["to"], str) and mark["to"].startswith("predictions."):
        mark = {**mark, "to": settings.topic(mark["to"])}
    await _commit_mark(settings, 1, mark)
    run = Redrive(settings=settings, options=_options(settings))
    await run.run()
    assert run.total("redriven") == len(_eligible(RUNNABLE))


async def test_two_redrives_at_once_never_send_a_letter_twice(settings: Settings) -> None:
    await _dead_letters(settings)
    runs = [Redrive(settings=settings, options=_options(settings)) for _ in range(2)]
    fenced: list[str] = []

    async def redrive(run: Redrive) -> None:
        try:
            await run.run()
        except FencedError as exc:  # the later run fenced this one
            fenced.append(str(exc))

    async with anyio.create_task_group() as both:
        for run in runs:
            both.start_soon(redrive, run)
    assert _ids(await _committed(settings)) == _eligible(
        {"fallback_failed", "expired", "no_fallback"}
    )
    # what each says it re-drove is what landed, once
    assert sum(run.total("redriven") for run in runs) == 12
    assert len(fenced) <= 1
    for line in fenced:
        assert f"transactional id {settings.group(GROUP)})" in line


async def _committed(settings: Settings) -> list[Any]:
    """The re-driven requests as the workers see them (read_committed)."""
    return await read_all(settings, settings.topic(REQUESTS), isolation="read_committed")


async def test_skipped_reasons_can_be_forced_later_and_only_once(settings: Settings) -> None:
    await _dead_letters(settings)
    first = Redrive(settings=settings, options=_options(settings))
    await first.run()
    assert first.counts[("unknown_model", "cannot succeed")] == 4

    forced = Redrive(
        settings=settings,
        options=_options(
            settings,
            reasons=frozenset({"unknown_model", "invalid_json"}),
            force=True,
            max_attempts=4,  # these letters ran 3 times already: the default cap
        ),
    )
    await forced.run()
    assert forced.counts[("unknown_model", "redriven")] == 4
    assert forced.counts[("invalid_json", "no request")] == 4  # nothing parsed to send

    everything = Redrive(settings=settings, options=_options(settings, force=True))
    await everything.run()
    assert everything.total("redriven") == 0
    sent = await read_all(settings, settings.topic(REQUESTS))
    expected = _eligible({"fallback_failed", "expired", "no_fallback", "unknown_model"}, force=True)
    assert _ids(sent) == expected


async def test_reasons_advance_independently(settings: Settings) -> None:
    await _dead_letters(settings)
    only = Redrive(settings=settings, options=_options(settings, reasons=frozenset({"expired"})))
    await only.run()
    assert _ids(await read_all(settings, settings.topic(REQUESTS))) == _eligible({"expired"})
    assert only.counts[("fallback_failed", "not selected")] == 4

    rest = Redrive(settings=settings, options=_options(settings))
    await rest.run()
    assert rest.counts[("expired", "already redriven")] == 4
    assert rest.counts[("fallback_failed", "redriven")] == 4
    sent = await read_all(settings, settings.topic(REQUESTS))
    assert _ids(sent) == _eligible({"fallback_failed", "expired", "no_fallback"})


async def test_dry_run_sends_and_commits_nothing(settings: Settings) -> None:
    await _dead_letters(settings)
    dry = Redrive(settings=settings, options=_options(settings, dry_run=True))
    await dry.run()
    assert dry.total("redriven") == 12
    assert await read_all(settings, settings.topic(REQUESTS)) == []

    real = Redrive(settings=settings, options=_options(settings))
    await real.run()
    assert real.total("redriven") == 12


async def test_progress_over_letters_written_in_transactions_ends_at_100_percent(
    settings: Settings, env: dict[str, str]
) -> None:
    """An exactly-once worker writes its dead letters in transactions: the span to read has
    a marker after each, which no batch holds. The progress counts offsets, as its total."""
    await create_topics(settings, {DEAD: 3, REQUESTS: 3, BACKFILL: 3})
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(), transactional_id=f"{settings.topic_prefix}letters"
    )
    await producer.start()
    try:
        for i in range(COUNT):  # a letter per transaction: as many markers as letters
            letter = _letter(i)
            async with producer.transaction():
                await producer.send(
                    settings.topic(DEAD),
                    letter.value,
                    key=letter.key,
                    partition=letter.partition,
                    timestamp_ms=letter.timestamp_ms,
                    headers=list(letter.headers),
                )
    finally:
        await producer.stop()
    done = await run_cli(env, "redrive")
    assert done.returncode == 0, done.stderr
    assert _ids(await read_all(settings, settings.topic(REQUESTS))) == _eligible(RUNNABLE)
    (last,) = [line for line in done.stderr.splitlines() if line.startswith("redrive: ")][-1:]
    assert f"{2 * COUNT}/{2 * COUNT} offsets (100%)" in last, done.stderr


async def test_since_picks_the_start_and_to_backfill(settings: Settings) -> None:
    await _dead_letters(settings)
    options = _options(settings, since_ms=BASE + 12_000, target=settings.topic(BACKFILL))
    await Redrive(settings=settings, options=options).run()
    assert await read_all(settings, settings.topic(REQUESTS)) == []
    sent = await read_all(settings, settings.topic(BACKFILL))
    assert _ids(sent) == [i for i in _eligible(set(REASONS)) if i >= 12]


async def test_unknown_reason_is_one_line(env: dict[str, str]) -> None:
    done = await run_cli(env, "redrive", "--reason", "timeout")
    assert done.returncode == 2  # a usage error
    assert "--reason timeout is not a dead-letter reason" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


async def test_redriven_requests_get_a_fresh_deadline(
    settings: Settings, env: dict[str, str]
) -> None:
    await create_topics(settings, {DEAD: 3, REQUESTS: 3, BACKFILL: 3})
    letters = [_letter(i) for i in (1, 7)]  # expired, the second a re-drive already
    for i, letter in zip((1, 7), letters, strict=True):
        value = orjson.loads(letter.value)
        value["request"]["deadline"] = "2001-01-01T00:00:00Z"
        headers = [*letter.headers, ("attempt", b"2")] if i == 7 else letter.headers
        letters[letters.index(letter)] = letter._replace(value=orjson.dumps(value), headers=headers)
    await produce(settings, settings.topic(DEAD), letters)
    before = time.time()
    done = await run_cli(env, "redrive", "--deadline", "10m")
    assert done.returncode == 0, done.stderr
    sent = await read_all(settings, settings.topic(REQUESTS))
    assert len(sent) == 2
    decoder = Decoder(
        Settings().topics_dir / "request.schema.json", max_bytes=4096, known_models=bool
    )
    for record in sent:
        deadline = decoder.decode(record.value, now=time.time()).deadline  # not expired
        assert deadline is not None and before + 590 <= deadline <= time.time() + 600
        assert dict(record.headers)["attempt"] in (b"2", b"3")


async def test_attempts_are_capped_so_re_drives_cannot_loop(settings: Settings) -> None:
    """A request that keeps failing goes round at most --max-attempts times."""
    await create_topics(settings, {DEAD: 1, REQUESTS: 1, BACKFILL: 1})
    letter = _letter(0)  # fallback_failed, attempt 1
    headers = [(k, v) for k, v in letter.headers if k != "attempt"]
    for round_ in range(1, 5):
        # it failed again: the stage wrote a dead letter with the attempt it ran as
        await produce(
            settings, settings.topic(DEAD), [letter._replace(partition=0, headers=headers)]
        )
        run = Redrive(settings=settings, options=_options(settings))
        await run.run()
        sent = await read_all(settings, settings.topic(REQUESTS))
        if round_ < 3:
            assert run.counts[("fallback_failed", "redriven")] == 1
            headers = [*headers[:2], ("attempt", dict(sent[-1].headers)["attempt"])]
        else:
            assert run.counts[("fallback_failed", "redriven")] == 0
            assert run.counts[("fallback_failed", "max attempts")] == round_ - 2
    assert [dict(r.headers)["attempt"] for r in sent] == [b"2", b"3"]


async def test_handler_errors_with_their_request_are_re_driven(settings: Settings) -> None:
    await create_topics(settings, {DEAD: 1, REQUESTS: 1, BACKFILL: 1})
    value = orjson.loads(_letter(0).value)
    value["reason"] = "handler_error"
    await produce(settings, settings.topic(DEAD), [Record(orjson.dumps(value), partition=0)])
    run = Redrive(settings=settings, options=_options(settings))
    await run.run()
    assert run.counts[("handler_error", "redriven")] == 1
    [sent] = await read_all(settings, settings.topic(REQUESTS))
    assert orjson.loads(sent.value) == value["request"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-attempts", "0"], "--max-attempts must be at least 1"),
        (["--deadline", "soon"], "--deadline 'soon' is not a duration"),
        (["--deadline", "0m"], "--deadline '0m' is not a duration"),
        (["--deadline", "999999w"], "--deadline 999999w is longer than 366 days"),
    ],
)
async def test_bad_redrive_options_are_one_line(
    env: dict[str, str], args: list[str], message: str
) -> None:
    done = await run_cli(env, "redrive", *args)
    assert done.returncode == 2  # a usage error, as argparse's own
    assert message in done.stderr and done.stderr.count("\n") == 1


def test_reasons_match_the_dead_letter_schema() -> None:
    assert set(REASONS) == set(_schema(DEAD)["properties"]["reason"]["enum"])


def test_the_json_help_names_every_outcome_of_the_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser(["redrive"]).parse_args(["redrive", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # as argparse wrapped it
    keys = (
        "redriven, already_redriven, cannot_succeed, no_request, max_attempts, not_selected, "
        "cannot_send"
    )
    assert f"reasons: {{REASON: {{{keys}}}}}" in shown


async def test_json_summary_for_scripts(settings: Settings, env: dict[str, str]) -> None:
    await _dead_letters(settings)
    dry = await run_cli(env, "redrive", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = orjson.loads(dry.stdout)
    assert report["dry_run"] is True and report["force"] is False
    assert report["outcome"] == "done" and report["group"] == settings.group(GROUP)
    assert report["reasons"]["unknown_model"] == {
        "redriven": 0,
        "already_redriven": 0,
        "cannot_succeed": 4,
        "no_request": 0,
        "not_selected": 0,
        "max_attempts": 0,
        "cannot_send": 0,
    }
    assert report["not_sent"] == []
    assert report["reasons"]["handler_error"]["no_request"] == 4
    assert report["total"]["redriven"] == 12  # what a real run would send
    assert await read_all(settings, settings.topic(REQUESTS)) == []

    done = orjson.loads((await run_cli(env, "redrive", "--json")).stdout)
    assert done["total"]["redriven"] == 12
    assert len(await read_all(settings, settings.topic(REQUESTS))) == 12
    again = orjson.loads((await run_cli(env, "redrive", "--json")).stdout)
    assert again["total"]["redriven"] == 0  # it starts after what was re-driven
    assert len(await read_all(settings, settings.topic(REQUESTS))) == 12


async def test_letters_of_any_reason_or_none_are_counted_in_rows_of_known_words(
    settings: Settings, env: dict[str, str]
) -> None:
    """A dead-letter topic is anyone's to write: a reason of escape codes and a newline
    cleared the operator's screen and drew a row of its own, each distinct junk reason
    was a row, and letters that are not JSON objects counted as "not selected"."""
    await create_topics(settings, {DEAD: 1, REQUESTS: 1, BACKFILL: 1})
    hostile: list[Any] = ["\x1b[2J\x1b[Hexpired\nfallback_failed   9999", "x" * 400, 12345, None]
    letters = [orjson.dumps({**_fallback_failed(i), "reason": r}) for i, r in enumerate(hostile)]
    letters += [b"{not json", b"[1, 2]", b"null"]
    await produce(settings, settings.topic(DEAD), [Record(v, partition=0) for v in letters])
    done = await run_cli(env, "redrive", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "x" * 400 not in done.stdout
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    # redriven, already, cannot succeed, no request, max attempts, not selected, cannot send
    assert rows["unknown"] == ["0", "0", "0", "0", "0", "4", "0"]
    assert rows["unreadable"] == ["0", "0", "0", "3", "0", "0", "0"]
    assert set(rows) == {"reason", "unknown", "unreadable", "total", settings.topic(DEAD)}
