"""Kafka requests of our own, where aiokafka lacks one or reads its answer wrong.

- **OffsetFetch.** From version 2, a group-level error comes as the answer's top-level
  error code, with no topics at all: NOT_COORDINATOR while the group's coordinator moves to
  another broker, COORDINATOR_LOAD_IN_PROGRESS while the new one reads the offsets topic.
  aiokafka 0.14 reads only the partitions' codes, so such an answer reads as "this group
  never committed". A worker then starts its partitions at the log start and pays for every
  answered request again; a re-drive sends its letters again; `stream lag` shows the whole
  log as lag. `fetch_offsets` raises the error instead, and its callers ask again.
  With `stable` it sends version 7 with `require_stable` (KIP-447): a transaction's offsets
  reach the group a few milliseconds after `commit_transaction` returns (the coordinator
  writes its markers after it answers), and meanwhile version 3 reads the offsets before
  it. An exactly-once worker reading its own last commit in a rebalance took that for
  another owner's commit, abandoned the partitions that came back, and paid for their
  running calls again (583 once). v7 answers UNSTABLE_OFFSET_COMMIT (retriable) instead.
- **DescribeCluster v2** (KIP-1073): the brokers the controllers know, fenced ones too.
  aiokafka's `describe_cluster` reads Metadata, which lists the live brokers only.
- **LeaveGroup v3** (KIP-345): leave by group instance id. aiokafka sends v0-1 (a member
  id alone), and never for a static member: Kafka's Java admin client removes static
  members this way (`removeMembersFromConsumerGroup`).
- **A coordinator lost mid-lookup.** A transactional producer looks its coordinators up
  again when they are not available, but aiokafka 0.14 ends its sender for good when a
  connection closes under the FindCoordinator itself (a broker killed at that moment):
  `ride_out_lost_coordinators` makes it look again.

Schemas: clients/src/main/resources/common/message/*.json in Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import (
    BrokerResponseError,
    GroupCoordinatorNotAvailableError,
    IncompatibleBrokerVersion,
    KafkaConnectionError,
    NotCoordinatorForGroupError,
    UnknownTopicOrPartitionError,
    for_code,
)
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.commit import (
    OffsetFetchRequest,
    OffsetFetchRequest_v1,
    OffsetFetchRequest_v2,
    OffsetFetchRequest_v3,
)
from aiokafka.protocol.types import (
    Array,
    Boolean,
    CompactArray,
    CompactString,
    Int8,
    Int16,
    Int32,
    Int64,
    Schema,
    String,
    TaggedFields,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

__all__ = [
    "coordinator_offsets",
    "fetch_offsets",
    "group_committed",
    "leave_group",
    "registered_brokers",
    "ride_out_lost_coordinators",
]

log = logging.getLogger(__name__)

Send = Callable[[Any], Awaitable[Any]]
Offsets = dict[TopicPartition, OffsetAndMetadata]

# The group's coordinator is elsewhere (or nowhere yet): find it again before the next try.
_MOVED = (NotCoordinatorForGroupError, GroupCoordinatorNotAvailableError)


async def fetch_offsets(
    send: Send,
    group: str,
    partitions: Iterable[TopicPartition] | None = None,
    *,
    stable: bool = False,
) -> Offsets:
    """The offsets `group` committed on `partitions` (None: on every partition it committed),
    as the broker `send` reaches answers. Partitions never committed, and topics that do not
    exist, are left out. A group-level or partition error raises as aiokafka's error type,
    whose `retriable` says whether asking again can help. `stable`: none of a transaction
    still settling (see the module docstring; `stream lag`, as Kafka's tool, does not ask)."""
    by_topic = None
    if partitions is not None:
        grouped: dict[str, list[int]] = defaultdict(list)
        for tp in partitions:
            grouped[tp.topic].append(tp.partition)
        by_topic = list(grouped.items())
    request = _StableOffsetFetch(group, by_topic) if stable else OffsetFetchRequest(group, by_topic)
    response = await send(request)
    _raise_for(getattr(response, "error_code", 0), group)  # v0 and v1 have none at the top
    found: Offsets = {}
    for topic, answered, *_ in response.topics:  # v7 adds tagged fields, v5 a leader epoch
        for fields in answered:
            partition, offset = fields[0], fields[1]
            metadata, code = fields[3:5] if len(fields) > 4 else fields[2:4]
            if code == UnknownTopicOrPartitionError.errno:
                continue
            _raise_for(code, group)
            if offset >= 0:
                found[TopicPartition(topic, partition)] = OffsetAndMetadata(offset, metadata)
    return found


class UnstableOffsetCommitError(BrokerResponseError):  # type: ignore[misc]
    """Kafka's UNSTABLE_OFFSET_COMMIT (aiokafka 0.14 has no class for it): a transaction's
    offsets are still settling; ask again."""

    errno = 88
    message = "UNSTABLE_OFFSET_COMMIT"
    description = "There are unstable offsets that need to be cleared."
    retriable = True


def _raise_for(code: int, group: str) -> None:
    if code:
        error = (
            UnstableOffsetCommitError if code == UnstableOffsetCommitError.errno else for_code(code)
        )
        raise error(f"fetching the committed offsets of group {group}")


async def coordinator_offsets(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]
) -> Offsets:
    """What the consumer's group committed on `partitions`, asked of its coordinator (found
    again when it moved), again after a back-off while Kafka says to retry: the caller bounds
    the wait; a stable read (none of a transaction still settling). In place of aiokafka's
    `fetch_committed_offsets`, which reads a top-level error as "nothing committed"."""
    coordinator = consumer._coordinator
    wanted = list(partitions)
    while True:
        await coordinator.ensure_coordinator_known()
        try:
            return await fetch_offsets(
                coordinator._send_req, coordinator.group_id, wanted, stable=True
            )
        except AIOKafkaError as exc:
            if not exc.retriable:
                raise
            if isinstance(exc, _MOVED):
                coordinator.coordinator_dead()
            await anyio.sleep(coordinator._retry_backoff_ms / 1000)


async def group_committed(
    admin: Any, group: str, partitions: Iterable[TopicPartition] | None = None
) -> Offsets:
    """What `group` committed (on `partitions`; None: everywhere), asked of its coordinator
    through an admin client; one try (callers retry with `stream.kafka.retrying`)."""
    node = await admin.find_coordinator(group)

    async def send(request: Any) -> Any:
        return await admin._send_request(request, node)

    return await fetch_offsets(send, group, partitions)


# -- OffsetFetch v7: require_stable -----------------------------------------------------------


class _OffsetFetchResponseV7(Response):  # type: ignore[misc]
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("topic", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition", Int32),
                        ("offset", Int64),
                        ("leader_epoch", Int32),
                        ("metadata", CompactString("utf-8")),
                        ("error_code", Int16),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class _OffsetFetchRequestV7(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = _OffsetFetchResponseV7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("topic", CompactString("utf-8")),
                ("partitions", CompactArray(Int32)),
                ("tags", TaggedFields),
            ),
        ),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


_OlderOffsetFetch = OffsetFetchRequest_v1 | OffsetFetchRequest_v2 | OffsetFetchRequest_v3


class _StableOffsetFetch(Request[_OlderOffsetFetch | _OffsetFetchRequestV7]):  # type: ignore[misc]
    """OffsetFetch with `require_stable` where the broker has version 7 (Kafka 2.5+); an
    older one is asked as aiokafka asks (it has no stable read to give)."""

    API_KEY = 9

    def __init__(self, group: str, partitions: list[tuple[str, list[int]]] | None) -> None:
        self._group = group
        self._partitions = partitions
        self._older = OffsetFetchRequest(group, partitions)

    def build(self, request_struct_class: Any) -> Any:
        if request_struct_class is not _OffsetFetchRequestV7:
            return self._older.build(request_struct_class)
        topics: list[tuple[str, list[int], dict[int, bytes]]] | None = None
        if self._partitions is not None:
            topics = [(topic, partitions, {}) for topic, partitions in self._partitions]
        return _OffsetFetchRequestV7(self._group, topics, True, {})


# -- DescribeCluster v2 ---------------------------------------------------------------------


class _DescribeClusterResponseV2(Response):  # type: ignore[misc]
    API_KEY = 60
    API_VERSION = 2
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("error_message", CompactString("utf-8")),
        ("endpoint_type", Int8),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        (
            "brokers",
            CompactArray(
                ("broker_id", Int32),
                ("host", CompactString("utf-8")),
                ("port", Int32),
                ("rack", CompactString("utf-8")),
                ("is_fenced", Boolean),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_authorized_operations", Int32),
        ("tags", TaggedFields),
    )


class _DescribeClusterRequestV2(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 60
    API_VERSION = 2
    RESPONSE_TYPE = _DescribeClusterResponseV2
    SCHEMA = Schema(
        ("include_cluster_authorized_operations", Boolean),
        ("endpoint_type", Int8),  # 1: brokers
        ("include_fenced_brokers", Boolean),
        ("tags", TaggedFields),
    )


class _DescribeCluster(Request[_DescribeClusterRequestV2]):  # type: ignore[misc]
    API_KEY = 60

    def build(self, request_struct_class: type[_DescribeClusterRequestV2]) -> Any:
        return request_struct_class(False, 1, True, {})


async def registered_brokers(admin: Any) -> dict[int, bool] | None:
    """Every broker registered with the controllers, running or fenced (stopped, or not yet
    caught up), as {id: fenced}; None from a broker older than Kafka 4.0 (no v2)."""
    try:
        response = await admin._send_request(_DescribeCluster())
    except (IncompatibleBrokerVersion, NotImplementedError):
        return None  # the version negotiation found no v2 on this broker
    if response.error_code:
        raise for_code(response.error_code)(response.error_message)
    return {int(broker[0]): bool(broker[4]) for broker in response.brokers}


# -- LeaveGroup v3 --------------------------------------------------------------------------


class _LeaveGroupResponseV3(Response):  # type: ignore[misc]
    API_KEY = 13
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        (
            "members",
            Array(
                ("member_id", String("utf-8")),
                ("group_instance_id", String("utf-8")),
                ("error_code", Int16),
            ),
        ),
    )


class _LeaveGroupRequestV3(RequestStruct):  # type: ignore[misc]
    API_KEY = 13
    API_VERSION = 3
    RESPONSE_TYPE = _LeaveGroupResponseV3
    SCHEMA = Schema(
        ("group_id", String("utf-8")),
        ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")))),
    )


class _LeaveGroup(Request[_LeaveGroupRequestV3]):  # type: ignore[misc]
    API_KEY = 13

    def __init__(self, group: str, member_id: str, instance_id: str) -> None:
        self._members = [(member_id, instance_id)]
        self._group = group

    def build(self, request_struct_class: type[_LeaveGroupRequestV3]) -> Any:
        return request_struct_class(self._group, self._members)


async def leave_group(admin: Any, group: str, member_id: str, instance_id: str) -> int:
    """Take the static member `instance_id` out of `group` (`member_id` "" for whichever
    member holds the id now; else only that one); one try, through an admin client.
    Returns Kafka's error code for the member: 0 it left, UNKNOWN_MEMBER_ID (25) the group
    has no such member, FENCED_INSTANCE_ID (82) another member holds the id."""
    node = await admin.find_coordinator(group)
    response = await admin._send_request(_LeaveGroup(group, member_id, instance_id), node)
    if response.error_code:
        raise for_code(response.error_code)(f"leaving group {group}")
    return int(response.members[0][2]) if response.members else 0


# -- a coordinator lost mid-lookup ------------------------------------------------------------


def ride_out_lost_coordinators(producer: Any) -> None:
    """Make a transactional `producer` look for its coordinators again when a connection
    closes under the lookup, as it does when a coordinator is not available. aiokafka 0.14
    raises that one as "Unexpected error during batch delivery", which ends the producer's
    sender: its transaction fails, and an exactly-once worker re-runs the partition from
    its last commit (it stopped: seen in CI, two of three brokers killed) for a blip the
    next lookup rides out. Other errors stay as they were."""
    sender = producer._sender
    find = sender._find_coordinator

    async def find_again(coordinator_type: Any, key: str) -> Any:
        while True:
            try:
                return await find(coordinator_type, key)
            except AIOKafkaError as exc:
                if not isinstance(exc.__cause__, KafkaConnectionError):
                    raise
                log.debug("looking for the coordinator of %s again: %s", key, exc)
                await producer.client.force_metadata_update()
                await asyncio.sleep(sender._retry_backoff)

    sender._find_coordinator = find_again
