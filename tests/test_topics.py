from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from aiokafka.admin import NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stream import topics
from stream.config import Settings
from stream.errors import TopicSpecError
from stream.kafka import admin_client
from tests.kit import eventually, run_cli
from tests.kit.kafka import partitions, topic_configs

pytestmark = pytest.mark.anyio

DECLARED = {
    "predictions.requests",
    "predictions.backfill",
    "predictions.fallback",
    "predictions.results",
    "predictions.dead-letter",
}


async def test_apply_creates_every_declared_topic_with_its_configs(settings: Settings) -> None:
    changes = await topics.plan(settings)
    assert {c.topic for c in changes} == {settings.topic(name) for name in DECLARED}
    assert all(c.action == "create" for c in changes)
    await topics.apply(settings, changes)

    for spec in topics.load_specs(settings.topics_dir, prefix=settings.topic_prefix):
        configs = await topic_configs(settings, spec.name)
        assert len(await partitions(settings, spec.name)) == spec.partitions
        assert configs["retention.ms"] == spec.configs["retention.ms"]
        assert configs["cleanup.policy"] == spec.configs["cleanup.policy"]
        # one broker: min.insync.replicas is fitted to the replication it can have
        assert configs["min.insync.replicas"] == "1"


async def test_second_apply_is_a_no_op(settings: Settings) -> None:
    await topics.apply(settings, await topics.plan(settings))
    again = await topics.plan(settings)
    assert [c.action for c in again] == ["ok"] * len(DECLARED)


async def test_config_drift_is_set_back_and_other_overrides_are_kept(settings: Settings) -> None:
    await topics.apply(settings, await topics.plan(settings))
    name = settings.topic("predictions.results")
    async with admin_client(settings.kafka, doing="test") as admin:
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC,
                    name,
                    configs={
                        "retention.ms": "1000",
                        "segment.ms": "3600000",
                        "min.insync.replicas": "1",
                        "cleanup.policy": "delete",
                        "max.message.bytes": "1048588",
                    },
                )
            ]
        )

    # the out-of-band change reaches the broker's metadata a moment after it is acknowledged
    async def altered() -> bool:
        return (await topic_configs(settings, name))["retention.ms"] == "1000"

    await eventually(altered)
    (change,) = [c for c in await topics.plan(settings) if c.topic == name]
    assert change.action == "update"
    assert change.configs == {"retention.ms": "604800000"}
    await topics.apply(settings, [change])
    configs = await topic_configs(settings, name)
    assert configs["retention.ms"] == "604800000"
    assert configs["segment.ms"] == "3600000"


async def test_fewer_partitions_made_out_of_band_is_drift(
    settings: Settings, env: dict[str, str]
) -> None:
    name = settings.topic("predictions.requests")
    async with admin_client(settings.kafka, doing="test") as admin:
        await admin.create_topics([NewTopic(name, 2, 1)])

    done = await run_cli(env, "topics", "apply")
    assert done.returncode == 3, done.stderr
    assert "drift" in done.stdout and "2 partitions, declared 6" in done.stdout
    assert name in done.stderr
    assert len(await partitions(settings, name)) == 2  # nothing destroyed or changed

    fixed = await run_cli(env, "topics", "apply", "--add-partitions")
    assert fixed.returncode == 0, fixed.stderr
    assert len(await partitions(settings, name)) == 6


async def test_dry_run_changes_nothing(settings: Settings, env: dict[str, str]) -> None:
    done = await run_cli(env, "topics", "apply", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "create" in done.stdout and "dry run" in done.stdout
    assert all(c.action == "create" for c in await topics.plan(settings))


GOOD = 'name = "x.topic"\npartitions = 3\nreplication_factor = 1\nschema = "s.json"\n'


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('name = "x"\npartitions = 3\nreplication_factor = 1\n', "'schema'"),
        (GOOD.replace("partitions = 3", "partitions = 0"), "'partitions'"),
        (GOOD.replace("partitions = 3", 'partitions = "3"'), "'partitions'"),
        (GOOD.replace("partitions = 3", 'partitions = "six"'), "'partitions' must be a whole"),
        (GOOD + '[configs]\n"min.insync.replicas" = "two"\n', "'min.insync.replicas'"),
        (GOOD.replace('"x.topic"', '"bad topic!"'), "'name'"),
        (GOOD + "colour = 1\n", "'colour'"),
        (GOOD + '[configs]\n"retention.ms" = 5\n', "'configs'"),
        (GOOD.replace('"s.json"', '"missing.json"'), "'schema'"),
        ("name = [", "not valid TOML"),
    ],
)
def test_malformed_topic_file_names_the_file_and_field(
    tmp_path: Path, text: str, field: str
) -> None:
    (tmp_path / "s.json").write_text("{}")
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(TopicSpecError) as caught:
        topics.load_specs(tmp_path)
    assert "bad.toml" in str(caught.value)
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ("{not json", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"type": "strin"}', "workers can compile"),
        ('{"properties": 3}', "workers can compile"),
    ],
)
def test_a_schema_the_workers_cannot_load_is_refused_naming_its_file(
    tmp_path: Path, schema: str, why: str
) -> None:
    (tmp_path / "s.json").write_text(schema)
    (tmp_path / "x.toml").write_text(GOOD)
    with pytest.raises(TopicSpecError) as caught:
        topics.load_specs(tmp_path)
    assert "s.json" in str(caught.value) and why in str(caught.value)
    assert "\n" not in str(caught.value)


def test_malformed_topic_file_is_one_line_without_traceback(
    tmp_path: Path, env: dict[str, str]
) -> None:
    (tmp_path / "bad.toml").write_text("partitions = 3\n")
    done = subprocess.run(
        [sys.executable, "-m", "stream", "topics", "apply"],
        env={**env, "STREAM_TOPICS_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "bad.toml" in done.stderr and "Traceback" not in done.stderr


def test_every_declared_topic_has_a_valid_json_schema() -> None:
    import jsonschema

    for spec in topics.load_specs(Settings().topics_dir):
        jsonschema.Draft7Validator.check_schema(topics.load_schema(spec))


async def test_json_plan_apply_and_drift_for_scripts(
    settings: Settings, env: dict[str, str]
) -> None:
    import orjson

    dry = await run_cli(env, "topics", "apply", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = orjson.loads(dry.stdout)
    assert plan["dry_run"] is True and plan["applied"] == 0 and plan["drift"] == []
    assert plan["bootstrap_servers"] == settings.kafka.bootstrap_servers
    assert {c["topic"] for c in plan["changes"]} == {settings.topic(n) for n in DECLARED}
    assert {c["action"] for c in plan["changes"]} == {"create"}
    assert all(isinstance(c["details"], list) for c in plan["changes"])

    applied = orjson.loads((await run_cli(env, "topics", "apply", "--json")).stdout)
    assert applied["dry_run"] is False and applied["applied"] == len(DECLARED)

    async with admin_client(settings.kafka, doing="test") as admin:
        await admin.create_partitions({settings.topic("predictions.backfill"): NewPartitions(7)})
    drift = await run_cli(env, "topics", "apply", "--json")
    assert drift.returncode == 3
    report = orjson.loads(drift.stdout)
    assert report["drift"] == [settings.topic("predictions.backfill")]
    assert report["applied"] == 0
    assert {c["action"] for c in report["changes"]} == {"ok", "drift"}


async def test_retry_for_rides_out_a_kafka_that_is_not_there_yet_then_says_why(
    env: dict[str, str],
) -> None:
    from stream.devtools.broker import free_port

    nowhere = {**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    done = await run_cli(nowhere, "topics", "apply", "--retry-for", "2")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) >= 2 and all("cannot reach Kafka" in line for line in lines)
    assert "trying again" in lines[0] and "Traceback" not in done.stderr


async def test_sigterm_while_it_waits_for_kafka_is_an_interruption(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A command with no drain of its own (an init container's `topics apply --retry-for`
    stopped by its pod's SIGTERM) exits 130 with its line, as Ctrl-C does: it died of the
    signal (143), silent."""
    from stream.devtools.broker import free_port

    nowhere = {**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    log = tmp_path / "apply.log"
    with log.open("wb") as stderr:
        process = await anyio.open_process(
            [sys.executable, "-m", "stream", "topics", "apply", "--retry-for", "120"],
            env=nowhere,
            stderr=stderr,
        )
    try:

        async def waiting() -> bool:
            return "trying again" in log.read_text()

        await eventually(waiting, timeout_s=60)
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            assert await process.wait() == 130, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert log.read_text().strip().splitlines()[-1] == "stream: interrupted"
    assert "Traceback" not in log.read_text()


def _declarations(tmp_path: Path, file: str, old: str, new: str) -> Path:
    """A copy of topics/ with `old` replaced by `new` in `file`."""
    folder = tmp_path / "topics"
    shutil.copytree(Settings().topics_dir, folder)
    path = folder / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    return folder


async def test_a_config_kafka_refuses_on_an_existing_topic_fails_in_one_line(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    assert (await run_cli(env, "topics", "apply")).returncode == 0
    name = settings.topic("predictions.results")
    folder = _declarations(tmp_path, "results.toml", '"604800000"', '"abc"')
    bigger = folder / "results.toml"  # a valid change in the same request, refused with it
    bigger.write_text(bigger.read_text().replace('"1048588"', '"1048600"'))

    # --retry-for: a refusal is a mistake in topics/, which trying again does not mend
    done = await run_cli(
        {**env, "STREAM_TOPICS_DIR": str(folder)}, "topics", "apply", "--retry-for", "60"
    )
    assert done.returncode == 1, done.stdout
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert name in done.stderr and "Invalid value abc for configuration retention.ms" in done.stderr
    configs = await topic_configs(settings, name)
    assert (configs["retention.ms"], configs["max.message.bytes"]) == ("604800000", "1048588")


async def test_settle_names_the_topics_the_brokers_do_not_serve_in_time(
    settings: Settings,
) -> None:
    never = topics.Change(topic=settings.topic("never.made"), action="create", partitions=1)
    async with admin_client(settings.kafka, doing="test") as admin:
        assert await topics._settle(admin, [never], timeout_s=0.5) == [never.topic]


async def test_applied_counts_a_config_set_on_a_topic_that_also_drifts(
    settings: Settings, env: dict[str, str]
) -> None:
    import orjson

    assert (await run_cli(env, "topics", "apply")).returncode == 0
    name = settings.topic("predictions.backfill")
    async with admin_client(settings.kafka, doing="test") as admin:
        await admin.create_partitions({name: NewPartitions(7)})
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, configs={"retention.ms": "1000"})]
        )

    async def altered() -> bool:
        return (await topic_configs(settings, name))["retention.ms"] == "1000"

    await eventually(altered)
    done = await run_cli(env, "topics", "apply", "--json")
    assert done.returncode == 3, done.stderr
    report = orjson.loads(done.stdout)
    assert report["drift"] == [name] and report["applied"] == 1
    assert (await topic_configs(settings, name))["retention.ms"] == "259200000"
    text = await run_cli(env, "topics", "apply")  # nothing left to set: the drift stays
    assert "applied: 0 changes" in text.stdout


def test_min_insync_replicas_is_fitted_to_the_replicas_a_topic_has() -> None:
    """A topic made with one replica on a three-broker cluster: apply reports the
    replication drift, and does not set min.insync.replicas 2 on it (no write could be in
    sync with two replicas of one)."""
    (spec,) = [s for s in topics.load_specs(Settings().topics_dir) if s.name.endswith("results")]
    assert int(spec.configs["min.insync.replicas"]) > 1 and spec.replication_factor == 3
    current = {"min.insync.replicas": "1"}
    change = topics._compare(spec, 3, spec.partitions, 1, current, False)
    assert "min.insync.replicas" not in change.configs, change.details
    assert change.action == "drift" and "replication 1, declared 3" in " ".join(change.details)
    mended = topics._compare(spec, 3, spec.partitions, 3, current, False)
    assert mended.configs["min.insync.replicas"] == spec.configs["min.insync.replicas"]
