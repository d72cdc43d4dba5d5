"""Static membership for one engine, and knowing when a newer process took its place.

With a group instance id (Kafka's `group.instance.id`, KIP-345) the broker keeps a member's
partitions across its restart: the process that joins again with the same id gets them
back at once, without a rebalance of the others and without waiting for the old session
to time out. The broker names such a member `<instance id>-<uuid>`.

Two live processes with one id: the newer takes the member over, and the broker answers
the older one's next heartbeat with UNKNOWN_MEMBER_ID (aiokafka 0.14 sends Heartbeat v0-1,
which carry no instance id, so it never hears FENCED_INSTANCE_ID as Kafka's Java client
does). aiokafka then forgets its member id and joins again, taking the member back; the
other does the same: both flap for ever, each re-fetching and re-calling. So:

- before every rejoin aiokafka calls the revoke callback; `dropped()` says whether the
  coordinator forgot our member id since our last assignment. That is either our session
  expiring (joining again is right) or a newer process with our id;
- `holder()` tells them apart from the group's description: a member whose id is our
  instance id plus a uuid, other than ours, is that newer process;
- fenced, the engine must never join again (that would take the member back): `hold()`
  parks aiokafka's coordinator inside the callback, and `release()` cancels its task when
  the engine closes, so closing neither waits for it nor sends a JoinGroup.

A static member never leaves on close (aiokafka sends no LeaveGroup for one, as Kafka's
Java consumer does not): a restart gets its partitions back. One stopped before its first
assignment has nothing to get back, and the rebalance its join began would give it
partitions it never fetches, waiting out its session (and the others, handing partitions
over to it, on probation meanwhile: the whole group paused). `leave()` takes it out by
instance id and member id (LeaveGroup v3, `stream.kafkawire.leave_group`): only with the
member id its join was answered with, so that it can never take out another process that
holds the id (a join still unanswered leaves nothing: its session ends it).

The coordinator's task, member id and generation are aiokafka 0.14 internals (pinned);
this module is the only place that touches them.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError as AIOKafkaError
from aiokafka.errors import UnknownError, UnknownMemberIdError

from stream.config import KafkaSettings
from stream.errors import FencedError, KafkaError, StreamError
from stream.kafka import admin_client
from stream.kafkawire import leave_group

__all__ = ["Membership", "group_instance_id"]

log = logging.getLogger(__name__)

_UUID_CHARS = 36
# Kafka's FENCED_INSTANCE_ID (aiokafka 0.14 has no class for it): another member has the id.
_FENCED_INSTANCE_ID = 82
# How long a stop may spend leaving (three round trips; a Kafka gone must not hold it).
_LEAVE_TIMEOUT_S = 3.0


def group_instance_id(instance_id: str | None, engine: str) -> str | None:
    """One static member per engine: `stream run all` runs two, `<id>-primary` and
    `<id>-fallback` (in two groups), and the name says which is which in `stream lag`."""
    return f"{instance_id}-{engine}" if instance_id else None


class Membership:
    """The engine's place in its group: member id and generation at the last assignment."""

    def __init__(self, settings: KafkaSettings, group_id: str, instance_id: str | None) -> None:
        self._settings = settings
        self.group_id = group_id
        self.instance_id = instance_id
        self.member_id = ""
        self.generation = -1
        self.fenced = False
        # the member id of the last join answered (aiokafka's close forgets it)
        self._joined_as = ""
        self._consumer: AIOKafkaConsumer | None = None

    def attach(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer

    @property
    def _coordinator(self) -> Any:
        assert self._consumer is not None, "no consumer attached"
        return self._consumer._coordinator

    def assigned(self) -> None:
        """Note the member id and generation the group just assigned partitions under."""
        self.member_id = self._coordinator.member_id
        self.generation = self._coordinator.generation

    def dropped(self) -> bool:
        """The group no longer knows the member id we were assigned partitions under: a
        session that expired, or (with an instance id) a newer process that took over."""
        return bool(self.member_id) and not self._coordinator.member_id

    def rejoin(self) -> None:
        """Ask the group for a rebalance (aiokafka has no public call for it): this member
        handed partitions over and claims them idle now (`stream.engine.assignor`)."""
        self._coordinator.request_rejoin()

    async def holder(self) -> str | None:
        """Who else holds our instance id in the group (None: nobody, or no instance id)."""
        if not self.instance_id:
            return None
        try:
            async with admin_client(self._settings, doing="describing the group") as admin:
                (response,) = await admin.describe_consumer_groups([self.group_id])
        except (AIOKafkaError, KafkaError, OSError) as exc:
            log.warning("could not describe group %s to check for a fence: %s", self.group_id, exc)
            return None
        for group in response.to_object()["groups"]:
            for member in group["members"]:
                if self._is_other_us(member["member_id"]):
                    return f"{member['client_host'].lstrip('/')} as {member['member_id']}"
        return None

    def _is_other_us(self, member_id: str) -> bool:
        prefix = f"{self.instance_id}-"
        if not member_id.startswith(prefix) or member_id == self.member_id:
            return False
        rest = member_id[len(prefix) :]
        try:
            return len(rest) == _UUID_CHARS and str(uuid.UUID(rest)) == rest
        except ValueError:
            return False

    def fence(self, holder: str) -> FencedError:
        self.fenced = True
        return FencedError(
            f"another process joined group {self.group_id} with instance id "
            f"{self.instance_id} (from {holder}) and took over its partitions, so this one "
            "stops: give every worker its own STREAM_INSTANCE_ID (e.g. its pod name), or "
            "stop the other"
        )

    async def explain(self, error: StreamError) -> StreamError:
        """`error`, or the fence behind it: a newer process with our id fences the old
        one's transactional producers and commits too, which is how it may show first."""
        if not self.fenced and (holder := await self.holder()) is not None:
            return self.fence(holder)
        return error

    async def explain_start(self, error: KafkaError) -> StreamError:
        """`error` from starting the consumer, or the fence behind it: Kafka answers a join
        whose instance id another process took at the same moment with FENCED_INSTANCE_ID,
        which aiokafka 0.14 reads as UnknownError and raises as `KafkaError("UnknownError()")`
        (any other error is only that error: no group lookup while Kafka is away)."""
        cause = error.__cause__
        if isinstance(cause, UnknownError) or "UnknownError" in str(cause):
            return await self.explain(error)
        return error

    async def hold(self) -> None:
        """Keep aiokafka's coordinator in this callback until `release()`: fenced, the
        engine must never join the group again."""
        await anyio.sleep_forever()

    async def release(self) -> None:
        """Cancel the coordinator's task (parked in `hold`), so closing the consumer does
        not wait for it, nor let it send a JoinGroup on its way out."""
        task = self._coordinator._coordination_task
        task.cancel()
        await asyncio.wait([task])

    async def close(self) -> None:
        """Stop the consumer (a fenced one's coordinator first: `release`), noting the member
        id its last join was answered with, for `leave`."""
        if self.fenced:
            await self.release()
        assert self._consumer is not None, "no consumer attached"
        try:
            self._joined_as = self._member_now()
            await self._consumer.stop()
        finally:
            self._joined_as = self._member_now() or self._joined_as

    def _member_now(self) -> str:
        """aiokafka's member id now ("" before an answered join, or if never started)."""
        coordinator = self._consumer._coordinator if self._consumer is not None else None
        return str(getattr(coordinator, "member_id", "") or "")

    async def leave(self) -> None:
        """Take this static member out of the group after a stop before its first
        assignment (see the module docstring): only by the member id its join was answered
        with, never when fenced (the id is another's now); bounded, and a failure is only
        logged: the session's end does it then."""
        member_id = self._joined_as or self.member_id
        if not self.instance_id or self.fenced or not member_id:
            return
        code: int | str = f"no answer in {_LEAVE_TIMEOUT_S:g} s"
        with anyio.move_on_after(_LEAVE_TIMEOUT_S):
            try:
                async with admin_client(self._settings, doing="leaving the group") as admin:
                    code = await leave_group(admin, self.group_id, member_id, self.instance_id)
            except (AIOKafkaError, KafkaError, OSError) as exc:
                code = str(exc)
        if code == 0:
            log.info(
                "left group %s as %s (stopped before its first assignment): its partitions "
                "go to the others now, not when its session ends",
                self.group_id,
                self.instance_id,
            )
        elif code not in (UnknownMemberIdError.errno, _FENCED_INSTANCE_ID):  # not ours to leave
            log.warning(
                "could not leave group %s as %s (%s): a partition assigned to it waits until "
                "its session ends",
                self.group_id,
                self.instance_id,
                f"Kafka's error {code}" if isinstance(code, int) else code,
            )
