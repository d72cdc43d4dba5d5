"""What the engine does when the group moves partitions: revoke, assign, committed offsets.

aiokafka speaks the eager protocol: on every membership change it calls
`on_partitions_revoked` with everything this member owns, rejoins, then calls
`on_partitions_assigned` with the new set, both in its coordinator task. The group waits
for every member's revoke, so a revoke that waits on running calls stops the whole group.
`Rebalancer` does not wait:

- **revoke**: the partitions go on probation (nothing new starts; running calls go on,
  holding their outputs), writes already under way land, what finished is committed, and
  it returns at once;
- **assign**: partitions that came back (and that nobody committed since) carry on with
  their running calls, queued records and offsets, fetching where they left off; those
  that moved are abandoned (their held outputs are never written; exactly-once: the new
  owner's producers fence ours); new ones start from their committed offset and the
  finished offsets in its metadata.

Dropped from the group (a session that expired), every partition is abandoned at once:
the others took them already. With a group instance id, a newer process may have taken
our place: then this one is fenced and stops (`stream.engine.membership`).

aiokafka logs and swallows what a listener raises: the partitions would stay assigned and
never be processed, or never be released. `Listener` keeps the first error instead; the
engine's fetch loop raises it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import anyio
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError
from aiokafka.errors import KafkaError as AIOKafkaError

from stream.config import Settings
from stream.engine.membership import Membership
from stream.engine.offsets import PartitionOffsets, decode_metadata, note_number, split_notes
from stream.engine.outputs import CLOSE_TIMEOUT_S, Sink
from stream.engine.partitions import Partition
from stream.engine.recovery import Unfinished, recover
from stream.errors import FencedError, KafkaError
from stream.kafka import translate
from stream.kafkawire import coordinator_offsets

__all__ = ["Listener", "Rebalancer", "partition_names", "seek"]

log = logging.getLogger(__name__)

Committed = dict[TopicPartition, tuple[int, str]]


def partition_names(tps: Iterable[TopicPartition]) -> list[str]:
    """Partitions as log fields: `topic[partition]`."""
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)


def seek(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
    """Move the fetch position of an assigned partition (no-op for one no longer ours)."""
    try:
        consumer.seek(tp, offset)
    except (IllegalStateError, AssertionError) as exc:  # aiokafka asserts mid-rebalance
        log.debug("not seeking %s to %d: %s", tp, offset, exc)


def _pause(consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
    try:
        consumer.pause(tp)
    except (IllegalStateError, AssertionError) as exc:  # no longer assigned
        log.debug("not pausing %s: %s", tp, exc)


def _resume(consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
    try:
        consumer.resume(tp)
    except (IllegalStateError, AssertionError) as exc:
        log.debug("not resuming %s: %s", tp, exc)


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's callbacks to the `Rebalancer`, keeping what they raise."""

    def __init__(self, rebalancer: Rebalancer, membership: Membership) -> None:
        self._rebalancer = rebalancer
        self._membership = membership
        self.error: BaseException | None = None

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._keep_error(self._rebalancer.revoke(revoked))
        if isinstance(self.error, FencedError):
            await self._membership.hold()  # never join again: the engine closes instead

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
        if isinstance(self.error, FencedError):
            raise self.error
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
        membership: Membership,
        outputs: Sequence[str] = (),
    ) -> None:
        """`outputs`: the topics the engine writes to, where a dead owner's finished work
        is found (`_recover`)."""
        self._settings = settings
        self._config = settings.engine
        self._consumer = consumer
        self._sink = sink
        self._partitions = partitions
        self._commit = commit
        self._low_priority = low_priority
        self._on_assigned = on_assigned
        self._membership = membership
        self._outputs = list(outputs)
        self.abandoned = 0  # running records abandoned: their next owner runs them again
        self.recovered = 0  # records a dead owner finished, found by their outputs
        self.rebalances = 0  # revokes that took partitions from this member

    # -- revoke --------------------------------------------------------------------------

    async def revoke(self, tps: Iterable[TopicPartition]) -> None:
        tps = set(tps)
        self.rebalances += bool(tps)
        if self._membership.dropped():
            await self._dropped()
            return
        # All of it must end within the rebalance timeout, or the group drops this worker
        # and its commit is refused: keep room to close producers after the commit.
        deadline = time.monotonic() + self._config.rebalance_timeout_ms / 1000 - CLOSE_TIMEOUT_S
        leaving = [self._partitions[tp] for tp in tps if tp in self._partitions]
        for partition in leaving:
            partition.probation()
        await self._writes_landed(leaving, deadline)
        try:
            with anyio.move_on_after(max(1.0, deadline - time.monotonic())) as budget:
                await self._commit(leaving)
            if budget.cancelled_caught:
                log.warning("commit on revoke ran out of time; the next owner re-runs the rest")
        except KafkaError as exc:
            log.warning("commit on revoke failed; the next owner re-runs from the last: %s", exc)
        if leaving:
            running = sum(p.in_flight for p in leaving)
            log.info(
                "%d partitions on probation, %d records running",
                len(leaving),
                running,
                extra={"partitions": partition_names(p.tp for p in leaving)},
            )

    async def _writes_landed(self, leaving: list[Partition], deadline: float) -> None:
        """Let writes of outputs already under way finish before the commit: one that
        landed after it, on a partition that then moved, would be written twice."""
        budget = min(self._settings.kafka.request_timeout_ms / 1000, deadline - time.monotonic())
        with anyio.move_on_after(max(0.0, budget / 2)) as waited:
            for partition in leaving:
                await partition.no_writes()
        if waited.cancelled_caught:
            # exactly-once: in a transaction that commits with their offsets, or is aborted
            once = self._settings.engine.guarantee == "exactly-once"
            outcome = "read_committed sees them once" if once else "they may be written twice"
            log.warning("outputs still being written on revoke; %s", outcome)

    async def _dropped(self) -> None:
        """The group forgot our member id: fenced by a newer process with our instance
        id, or our session expired and the others took our partitions already."""
        holder = await self._membership.holder()
        await self.abandon(list(self._partitions.values()))
        if holder is not None:
            raise self._membership.fence(holder)
        group = self._membership.group_id
        log.warning("dropped from group %s (session expired?); joining again", group)

    async def abandon(self, partitions: list[Partition]) -> None:
        """Forget partitions that left: cancel their runs, close their producers."""
        abandoned = 0
        for partition in partitions:
            partition.drop_queued()
            abandoned += partition.abandon()
            self._partitions.pop(partition.tp, None)
        self.abandoned += abandoned
        await self._sink.revoked([p.tp for p in partitions])
        if partitions:
            log.info(
                "%d partitions left: %d running records abandoned (their next owner runs "
                "them again)",
                len(partitions),
                abandoned,
                extra={
                    "partitions": partition_names(p.tp for p in partitions),
                    "abandoned": abandoned,
                },
            )

    # -- assign --------------------------------------------------------------------------

    async def assign(self, tps: Iterable[TopicPartition]) -> None:
        tps = set(tps)
        # New partitions are not fetched until they are set up (`_start` resumes them):
        # the fetch loop runs meanwhile, and each fetch of one would be put back, read
        # again, and (a record the client cannot decode at its log start) reported again,
        # for the whole callback, recovery scan included.
        for tp in tps - self._partitions.keys():
            _pause(self._consumer, tp)
        self._membership.assigned()
        on_probation = {tp: p for tp, p in self._partitions.items() if p.on_probation}
        await self.abandon([p for tp, p in on_probation.items() if tp not in tps])
        # Exactly-once: start the new partitions' producers first; that fences the previous
        # owner and settles its open transaction, so the committed offsets read next are
        # final. Those that came back still have theirs.
        await self._sink.assigned(tps)
        committed = await self.committed(tps)
        back = [p for tp, p in on_probation.items() if tp in tps]
        # Someone committed in between (we were out of the group for a while), or its
        # transaction failed: what we hold is out of date. Start those afresh.
        stale = [p for p in back if p.abandoned or committed.get(p.tp) != p.committed]
        if stale:
            for partition in stale:  # set up afresh below: not fetched until then
                _pause(self._consumer, partition.tp)
            await self.abandon(stale)
            await self._sink.assigned(p.tp for p in stale)
            for partition in stale:
                committed.pop(partition.tp, None)
            committed.update(await self.committed({p.tp for p in stale}))
        for partition in back:
            if partition not in stale:
                self._carry_on(partition)
        fresh = [tp for tp in tps if tp not in self._partitions]
        recovered = await self._recover(fresh, committed)
        for tp in fresh:
            self._start(tp, committed.get(tp), recovered.get(tp, set()))
        kept = [p.tp for p in back if p not in stale]
        log.info(
            "assigned %d partitions: %d came back with their running records, %d new",
            len(tps),
            len(kept),
            len(fresh),
            extra={"kept": partition_names(kept), "new": partition_names(fresh)},
        )
        self._on_assigned()

    def _carry_on(self, partition: Partition) -> None:
        partition.resume()
        tp = partition.tp
        # Between aiokafka taking the new assignment and this callback, the fetch loop may
        # have paused the partition (it was on probation then): unpaused, as `resume` says,
        # or flow control would believe it fetching and never resume it.
        _resume(self._consumer, tp)
        # aiokafka would fetch from the committed offset again: continue after the last
        # record this worker fetched (queued and running ones are still here).
        if (position := partition.offsets.next_expected) is not None:
            seek(self._consumer, tp, position)

    async def _recover(
        self, fresh: list[TopicPartition], committed: Committed
    ) -> dict[TopicPartition, set[int]]:
        """The records of `fresh` partitions a dead at-least-once owner finished after its
        last commit, found by their outputs (`stream.engine.recovery`). Only an at-least-
        once commit carries the `since` note; an exactly-once worker that meets one (a group
        run with mixed STREAM_GUARANTEE) looks too, or it would write those outputs again."""
        if not self._outputs:
            return {}
        wanted = {}
        for tp in fresh:
            if (position := committed.get(tp)) is not None:
                notes = split_notes(position[1])[1]
                if (since := note_number(notes, "since")) is not None:
                    wanted[tp] = Unfinished(position[0], since, notes.get("spread") == "1")
        if wanted and self._config.guarantee != "at-least-once":
            log.warning(
                "%s were last committed by an at-least-once worker, and this one runs "
                "exactly-once: their outputs written after that commit are looked for; run "
                "every worker of a group with the same STREAM_GUARANTEE",
                partition_names(wanted),
            )
        return await recover(self._settings.kafka, wanted, self._outputs)

    def _start(
        self, tp: TopicPartition, committed: tuple[int, str] | None, recovered: set[int]
    ) -> None:
        metadata = ""
        if committed is None:
            offsets = PartitionOffsets(-1)  # position unknown: accept from wherever
        else:
            offset, metadata = committed
            finished = set(decode_metadata(metadata, offset))
            if found := recovered - finished:
                self.recovered += len(found)
                log.info(
                    "%s[%d]: %d records finished by the previous owner after its last "
                    "commit (their outputs are in Kafka): not run again",
                    tp.topic,
                    tp.partition,
                    len(found),
                )
            offsets = PartitionOffsets(offset, sorted(finished | found))
            seek(self._consumer, tp, offset)
        self._partitions[tp] = partition = Partition(
            tp,
            offsets,
            low_priority=tp.topic in self._low_priority,
            key_ordering=self._config.ordering == "key",
            started_before=_started(metadata),
        )
        # The same as Kafka has it: an unchanged partition is not committed again (its
        # `since` note, if any, makes an at-least-once one due at once all the same).
        partition.committed = partition.committed_base = committed
        partition.spread = split_notes(metadata)[1].get("spread") == "1"  # inherited
        _resume(self._consumer, tp)  # paused while it was set up (`assign`)

    async def committed(self, tps: set[TopicPartition]) -> Committed:
        """Committed offset and metadata per partition (the consumer's API drops metadata)."""
        try:
            # Our own OffsetFetch (aiokafka's reads a coordinator moving as "nothing
            # committed": every partition would start over). It asks again while Kafka
            # says to: bounded, a rebalance callback must end.
            with anyio.fail_after(self._settings.kafka.request_timeout_ms / 1000):
                found = await coordinator_offsets(self._consumer, tps)
        except (AIOKafkaError, TimeoutError) as exc:
            raise translate(exc, self._settings.kafka, "reading committed offsets") from exc
        return {tp: (om.offset, om.metadata or "") for tp, om in found.items()}


def _started(metadata: str) -> int:
    """The `started` note a previous owner committed (-1: none, or not ours)."""
    started = note_number(split_notes(metadata)[1], "started")
    return -1 if started is None else started
