"""Committed offsets read through our own OffsetFetch (`stream.kafkawire`), on the local
three-broker cluster, where a group's coordinator is one broker and the others answer
NOT_COORDINATOR at the top of their answer, with no partitions. aiokafka reads that answer
as "nothing committed"; a worker would then start its partitions over (every answered
request paid for again), a re-drive would send its letters again, and lag would show the
whole log."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import NotCoordinatorForGroupError

from stream.config import Settings
from stream.kafka import admin_client, group_offsets
from stream.kafkawire import Send, coordinator_offsets, fetch_offsets
from tests.kit.kafka import commit, create_topic

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


@pytest.fixture
def settings_for(cluster_env: dict[str, str]) -> Settings:
    return Settings.from_env(cluster_env)


async def _committed_group(settings: Settings) -> tuple[str, list[TopicPartition]]:
    """A group with offsets (and metadata) committed on two of three partitions."""
    topic = await create_topic(settings, "offsets", 3)
    tps = [TopicPartition(topic, p) for p in range(3)]
    group = settings.topic("group")
    await commit(settings, group, {tps[0]: 5, tps[1]: 7}, metadata="started=9")
    return group, tps


async def _coordinator_and_other(settings: Settings, group: str) -> tuple[int, int]:
    async with admin_client(settings.kafka, doing="finding the coordinator") as admin:
        coordinator = int(await admin.find_coordinator(group))
        others = [b.nodeId for b in admin._client.cluster.brokers() if b.nodeId != coordinator]
    return coordinator, others[0]


def _to(admin: Any, node: int) -> Send:
    """Requests to one broker, whichever it is."""

    async def send(request: Any) -> Any:
        return await admin._send_request(request, node)

    return send


async def test_a_broker_that_is_not_the_coordinator_raises_a_retriable_error(
    settings_for: Settings,
) -> None:
    settings = settings_for
    group, tps = await _committed_group(settings)
    coordinator, other = await _coordinator_and_other(settings, group)
    async with admin_client(settings.kafka, doing="reading offsets") as admin:
        with pytest.raises(NotCoordinatorForGroupError) as raised:
            await fetch_offsets(_to(admin, other), group, tps)
        assert raised.value.retriable
        right = await fetch_offsets(_to(admin, coordinator), group, tps)
        everywhere = await group_offsets(admin, group)  # finds the coordinator itself
    expected = {tps[0]: (5, "started=9"), tps[1]: (7, "started=9")}  # never committed: absent
    assert {tp: (om.offset, om.metadata) for tp, om in right.items()} == expected
    assert {tp: (om.offset, om.metadata) for tp, om in everywhere.items()} == expected


async def test_a_consumer_that_asks_the_wrong_broker_finds_the_coordinator_again(
    settings_for: Settings,
) -> None:
    """As when the coordinator moved between the group's join and the offsets' fetch."""
    settings = settings_for
    group, tps = await _committed_group(settings)
    _coordinator, other = await _coordinator_and_other(settings, group)
    consumer = AIOKafkaConsumer(
        group_id=group, enable_auto_commit=False, **settings.kafka.client_options()
    )
    await consumer.start()
    try:
        coordinator = consumer._coordinator
        await coordinator.ensure_coordinator_known()
        coordinator.coordinator_id = other
        # aiokafka's own fetch takes the refusal for "nothing committed" (why ours exists:
        # if this starts failing, aiokafka mended it).
        assert await coordinator.fetch_committed_offsets(tps) == {}
        coordinator.coordinator_id = other
        found = await coordinator_offsets(consumer, tps)
    finally:
        await consumer.stop()
    assert {tp: om.offset for tp, om in found.items()} == {tps[0]: 5, tps[1]: 7}
    assert {om.metadata for om in found.values()} == {"started=9"}
