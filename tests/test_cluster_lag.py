"""Lag on the three-broker cluster while its group coordinator dies: a one-shot `stream
lag` rides out the move to another broker, `--watch` goes on through it."""

from __future__ import annotations

import functools
import time

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic

from stream.config import Settings
from stream.devtools.cluster import LocalCluster, describe_partitions
from stream.kafka import admin_client
from tests.kit import eventually, run_cli
from tests.kit.cluster import BROKERS, stop
from tests.kit.kafka import commit, produce
from tests.kit.lag import Watch, stamped, watching

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


async def test_lag_rides_out_its_group_coordinator_killed(
    cluster: LocalCluster, cluster_env: dict[str, str]
) -> None:
    settings = Settings.from_env(cluster_env)
    topic = settings.topic("lag.coordinator")
    async with admin_client(settings.kafka, doing="test") as admin:
        await admin.create_topics([NewTopic(topic, BROKERS, BROKERS)])
    await eventually(functools.partial(has_leaders, settings, topic))
    now = int(time.time() * 1000)
    for partition in range(BROKERS):
        await produce(settings, topic, stamped(partition, [now] * 3))
    group = settings.group("lag")
    await commit(settings, group, {TopicPartition(topic, p): 1 for p in range(BROKERS)})
    async with admin_client(settings.kafka, doing="test") as admin:
        coordinator = await admin.find_coordinator(group)
    expected = [(topic, p, 1, 3, 2) for p in range(BROKERS)]

    async with watching(cluster_env, "--group", group, "--json", "--interval", "0.5") as watch:
        await eventually(functools.partial(frames, watch, 1))
        await stop(cluster, cluster.broker(coordinator))
        # records wait and no member owns them: UNOWNED, exit 3 (1 was the coordinator lost)
        once = await run_cli(cluster_env, "lag", "--group", group, "--json")
        assert once.returncode == 3, once.stderr
        assert rows(once.stdout) == expected

        # the watch saw the coordinator gone, said so on stderr, and reads again since
        assert any("reading failed" in line for line in watch.err), watch.err
        seen = len(watch.out)
        await eventually(functools.partial(frames, watch, seen + 2))
        assert rows(watch.out[-1]) == expected


async def frames(watch: Watch, count: int) -> bool:
    assert watch.process.returncode is None, watch.err  # it watches until told to stop
    return len(watch.out) >= count


def rows(text: str) -> list[tuple[str, int, int, int, int]]:
    return sorted(
        (r["topic"], r["partition"], r["committed"], r["end"], r["lag"]) for r in orjson.loads(text)
    )


async def has_leaders(settings: Settings, topic: str) -> bool:
    states = await describe_partitions(settings.kafka, [topic])
    return len(states) == BROKERS and all(s.leader >= 0 for s in states.values())
