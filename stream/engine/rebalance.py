"""What the engine does when the group moves partitions: revoke, assign, committed offsets.

aiokafka speaks the eager protocol: on every membership change it calls
`on_partitions_revoked` with everything this member owns, rejoins, then calls
`on_partitions_assigned` with the new set, both in its coordinator task. `Rebalancer` does
the engine's part of each, within the rebalance timeout: on revoke, let running records
finish (up to the revoke grace), commit what finished, release the partitions; on assign,
set each partition up from its committed offset and the finished offsets in its metadata.

aiokafka logs and swallows what a listener raises: the partitions would stay assigned and
never be processed, or never be released. `Listener` keeps the first error instead; the
engine's fetch loop raises it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import anyio
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError
from aiokafka.errors import KafkaError as AIOKafkaError

from stream.config import Settings
from stream.engine.offsets import PartitionOffsets, decode_metadata, split_notes
from stream.engine.outputs import CLOSE_TIMEOUT_S, Sink
from stream.engine.partitions import Partition
from stream.errors import KafkaError
from stream.kafka import translate

__all__ = ["Listener", "Rebalancer", "seek"]

log = logging.getLogger(__name__)


def seek(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
    """Move the fetch position of an assigned partition (no-op for one no longer ours)."""
    try:
        consumer.seek(tp, offset)
    except (IllegalStateError, AssertionError) as exc:  # aiokafka asserts mid-rebalance
        log.debug("not seeking %s to %d: %s", tp, offset, exc)


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's callbacks to the `Rebalancer`, keeping what they raise."""

    def __init__(self, rebalancer: Rebalancer) -> None:
        self._rebalancer = rebalancer
        self.error: BaseException | None = None

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._keep_error(self._rebalancer.revoke(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._keep_error(self._rebalancer.assign(assigned))

    async def _keep_error(self, step: Awaitable[None]) -> None:
        try:
            await step
        except Exception as exc:
            if self.error is None:
                self.error = exc

    def raise_error(self) -> None:
        """Raise the first error a callback hit, as our `KafkaError`."""
        if self.error is not None:
            raise KafkaError(f"handling a rebalance failed: {self.error}") from self.error


class Rebalancer:
    """Revoke and assign for one engine; the engine's partitions dict is shared with it."""

    def __init__(
        self,
        *,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        sink: Sink,
        partitions: dict[TopicPartition, Partition],
        commit: Callable[[Iterable[Partition]], Awaitable[None]],
        low_priority: frozenset[str],
        on_assigned: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._config = settings.engine
        self._consumer = consumer
        self._sink = sink
        self._partitions = partitions
        self._commit = commit
        self._low_priority = low_priority
        self._on_assigned = on_assigned

    async def revoke(self, tps: Iterable[TopicPartition]) -> None:
        # All of it must end within the rebalance timeout, or the group drops this worker
        # and its commit is refused: the grace, then the commit in what is left after
        # keeping room to close the partitions' producers.
        deadline = time.monotonic() + self._config.rebalance_timeout_ms / 1000 - CLOSE_TIMEOUT_S
        leaving = [self._partitions[tp] for tp in tps if tp in self._partitions]
        for partition in leaving:
            partition.revoked = True
            partition.drop_queued()
        with anyio.move_on_after(self._config.revoke_grace_s):
            for partition in leaving:
                await partition.idle.wait()
        abandoned = sum(p.abandon() for p in leaving)
        try:
            with anyio.move_on_after(max(1.0, deadline - time.monotonic())) as budget:
                await self._commit(leaving)
            if budget.cancelled_caught:
                log.warning("commit on revoke ran out of time; the new owner re-runs from the last")
        except KafkaError as exc:
            log.warning("commit on revoke failed; the new owner re-runs from the last: %s", exc)
        finally:
            for partition in leaving:
                self._partitions.pop(partition.tp, None)
            await self._sink.revoked([p.tp for p in leaving])
        log.info("revoked %d partitions (%d running records abandoned)", len(leaving), abandoned)

    async def assign(self, tps: Iterable[TopicPartition]) -> None:
        tps = set(tps)
        # Exactly-once: start the partition producers first; that fences the previous owner
        # and settles its open transaction, so the committed offsets read next are final.
        await self._sink.assigned(tps)
        committed = await self.committed(tps)
        key_ordering = self._config.ordering == "key"
        for tp in tps:
            offset, metadata = committed.get(tp, (None, ""))
            if offset is None:
                offsets = PartitionOffsets(-1)  # position unknown: accept from wherever
            else:
                offsets = PartitionOffsets(offset, decode_metadata(metadata, offset))
                seek(self._consumer, tp, offset)
            self._partitions[tp] = Partition(
                tp,
                offsets,
                low_priority=tp.topic in self._low_priority,
                key_ordering=key_ordering,
                started_before=_started(metadata),
            )
        log.info("assigned %d partitions", len(tps))
        self._on_assigned()

    async def committed(self, tps: set[TopicPartition]) -> dict[TopicPartition, tuple[int, str]]:
        """Committed offset and metadata per partition (the consumer's API drops metadata)."""
        try:
            # aiokafka 0.14 (pinned): the coordinator's fetch keeps the metadata. It retries
            # retriable errors for ever: bound it, a rebalance callback must end.
            with anyio.fail_after(self._settings.kafka.request_timeout_ms / 1000):
                found = await self._consumer._coordinator.fetch_committed_offsets(list(tps))
        except (AIOKafkaError, TimeoutError) as exc:
            raise translate(exc, self._settings.kafka, "reading committed offsets") from exc
        return {tp: (om.offset, om.metadata or "") for tp, om in found.items()}


def _started(metadata: str) -> int:
    """The `started` note a previous owner committed (-1: none, or not ours)."""
    value = split_notes(metadata)[1].get("started", "")
    return int(value) if value.isdigit() else -1
