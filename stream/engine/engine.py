"""The stream-processing engine: a stage is an async handler `record → outputs`.

    run ─┬─ _fetch ── _dispatch ── flow.start_ready ── _process ── sink.write
         └─ _commit_loop ── _commit ── sink.commit

Hundreds of records of the same partitions run at once. What starts when, and which
partitions pause (bounded memory, live before backfill): `stream.engine.flow`. Offsets:
`stream.engine.offsets`; outputs and commits: `stream.engine.outputs`; per-partition state:
`stream.engine.partitions`; rebalances: `stream.engine.rebalance` (with the sticky
assignor of `stream.engine.assignor`, and static membership: `stream.engine.membership`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError as AIOKafkaError
from anyio.abc import TaskGroup

from stream.config import Settings
from stream.engine.clients import make_consumer, make_sink
from stream.engine.fetch import UNDECODABLE, StandIn, stand_in_for_undecodable, to_keep
from stream.engine.flow import Flow, Gate
from stream.engine.handover import Handover
from stream.engine.late import stuck_outputs
from stream.engine.membership import Membership, group_instance_id
from stream.engine.outputs import CLOSE_TIMEOUT_S, Output, Sink
from stream.engine.partitions import EngineSnapshot, Partition, PartitionSnapshot, Record, Runner
from stream.engine.rebalance import Listener, Rebalancer, seek
from stream.engine.signals import drain
from stream.errors import KafkaError, OutputRejectedError, RecordReleased
from stream.kafka import start_client, translate
from stream.release import current as release_of_record

__all__ = [
    "Engine",
    "EngineSnapshot",
    "ErrorHandler",
    "Gate",
    "Handler",
    "Output",
    "PartitionSnapshot",
]

log = logging.getLogger(__name__)

Handler = Callable[[Record], Awaitable[Sequence[Output]]]
ErrorHandler = Callable[[Record, BaseException], Sequence[Output]]

_POLL_TIMEOUT_MS = 100
_SLICE = 32  # records a fetch round starts before it lets them run
_UNSTARTED_CLOSE_S = 1.0  # the consumer's stop, for an engine never assigned anything


class Engine:
    def __init__(
        self,
        *,
        settings: Settings,
        name: str,
        group_id: str,
        topics: Sequence[str],
        handler: Handler,
        on_error: ErrorHandler,
        low_priority_topics: Sequence[str] = (),
        on_commit: Callable[[float], None] | None = None,
        gate: Gate | None = None,
        output_topics: Sequence[str] = (),
    ) -> None:
        """`gate`: holds records of a topic back (and pauses its partitions) while it says;
        `output_topics`: where the handler writes, made known to the producers at start
        (else the first outputs after a start wait for their metadata)."""
        self._settings = settings
        self._on_commit = on_commit  # hears each successful commit's duration in seconds
        self._config = settings.engine
        self.name = name
        self.group_id = group_id
        self._topics = list(dict.fromkeys([*topics, *low_priority_topics]))
        self._low_priority = frozenset(low_priority_topics)
        self._output_topics = list(dict.fromkeys(output_topics))
        self._handler = handler
        self._on_error = on_error
        self.ready = anyio.Event()
        self._unassigned_at_stop = False  # stopped before its first assignment: it leaves
        self._stopping = anyio.Event()
        # While the clients start: aiokafka's consumer `start` waits for the first
        # assignment without a deadline (a rebalance waiting for a member gone silent, a
        # broker gone meanwhile), an idempotent producer for its id. A stop cancels it:
        # nothing runs yet, nothing to drain.
        self._starting: anyio.CancelScope | None = None
        self._partitions: dict[TopicPartition, Partition] = {}
        self._flow = Flow(self._config, self._partitions, self._spawn, gate)
        self._commit_lock = anyio.Lock()
        self._task_group: TaskGroup | None = None
        self.membership = Membership(
            settings.kafka, group_id, group_instance_id(self._config.instance_id, name)
        )
        self._handover = Handover(self._partitions, self.membership, self._shutdown_grace_s)
        # aiokafka clients need a running event loop: they are made in `run`.
        self._clients: tuple[AIOKafkaConsumer, Sink, Listener, Rebalancer] | None = None
        self.records_in = self.records_done = self.handler_errors = self.commits = 0
        self.records_redelivered = self.records_released = 0
        self.last_commit_seconds = 0.0

    @property
    def _consumer(self) -> AIOKafkaConsumer:
        assert self._clients is not None, "the engine is not running"
        return self._clients[0]

    @property
    def _sink(self) -> Sink:
        assert self._clients is not None, "the engine is not running"
        return self._clients[1]

    @property
    def _listener(self) -> Listener:
        assert self._clients is not None, "the engine is not running"
        return self._clients[2]

    @property
    def _rebalancer(self) -> Rebalancer:
        assert self._clients is not None, "the engine is not running"
        return self._clients[3]

    # -- public surface -----------------------------------------------------------------

    async def run(self) -> None:
        """Process until `stop()` (or cancellation); drain, commit and close on the way out."""
        await self._start()
        try:
            async with anyio.create_task_group() as group:
                self._task_group = group
                group.start_soon(self._commit_loop)
                group.start_soon(self._handover.run, self._stopping)
                await self._fetch()
                await self._drain(self._shutdown_grace_s())
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._final_commit()
                finally:
                    await self._close()

    async def _final_commit(self) -> None:
        """Commit what finished, also when the engine is failing: never pay twice for it."""
        try:
            with anyio.move_on_after(CLOSE_TIMEOUT_S):
                await self._commit()
        except KafkaError as exc:
            log.warning("final commit failed; unfinished work re-runs from the last: %s", exc)

    def stop(self) -> None:
        """Graceful stop: no new work, drain up to `shutdown_grace_s`, commit, close."""
        self._unassigned_at_stop |= not self._stopping.is_set() and not self.ready.is_set()
        self._stopping.set()
        if self._starting is not None:
            self._starting.cancel()

    def partitions(self) -> tuple[TopicPartition, ...]:
        """The partitions this engine holds now (cheaper than a snapshot)."""
        return tuple(self._partitions)

    def snapshot(self) -> EngineSnapshot:
        rebalancer = self._clients[3] if self._clients is not None else None
        return EngineSnapshot(
            name=self.name,
            group_id=self.group_id,
            guarantee=self._config.guarantee,
            assigned=len(self._partitions),
            in_flight=self._flow.in_flight,
            records_in=self.records_in,
            records_done=self.records_done,
            handler_errors=self.handler_errors,
            commits=self.commits,
            last_commit_seconds=self.last_commit_seconds,
            partitions=tuple(p.snapshot() for p in self._partitions.values()),
            records_redelivered=self.records_redelivered,
            records_released=self.records_released,
            abandoned=rebalancer.abandoned if rebalancer else 0,
            records_recovered=rebalancer.recovered if rebalancer else 0,
            rebalances=rebalancer.rebalances if rebalancer else 0,
        )

    def problem(self) -> str | None:
        """Why this engine is not making progress, if it is stuck (`late.stuck_outputs`)."""
        return stuck_outputs(self._partitions.values(), time.monotonic())

    def __repr__(self) -> str:
        s = self.snapshot()
        return (
            f"<Engine {s.name} group={s.group_id} {s.guarantee} assigned={s.assigned} "
            f"in_flight={s.in_flight} in={s.records_in} done={s.records_done} "
            f"errors={s.handler_errors} commits={s.commits} rebalances={s.rebalances} "
            f"abandoned={s.abandoned}>"
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def _start(self) -> None:
        instance_id = self.membership.instance_id
        consumer = make_consumer(
            self._settings, self.group_id, instance_id, self._handover.claims, self._handover.heard
        )
        self.membership.attach(consumer)
        sink = make_sink(
            self._settings, self.group_id, consumer, [*self._output_topics, *self._topics]
        )
        rebalancer = Rebalancer(
            settings=self._settings,
            consumer=consumer,
            sink=sink,
            partitions=self._partitions,
            commit=self._commit,
            low_priority=self._low_priority,
            on_assigned=self._assigned,
            membership=self.membership,
            outputs=self._output_topics,
        )
        listener = Listener(rebalancer, self.membership)
        self._clients = (consumer, sink, listener, rebalancer)
        try:
            with anyio.CancelScope() as self._starting:
                if self._stopping.is_set():
                    self._starting.cancel()
                # The producer too: an idempotent one asks Kafka for its id until it
                # answers (a broker that stopped answering after the topic check).
                await sink.start()
                consumer.subscribe(self._topics, listener=listener)
                kafka, doing = self._settings.kafka, "starting the consumer"
                try:  # cancelled, it is stopped below (outside this scope)
                    await start_client(consumer, kafka, doing, stop_if_cancelled=False)
                except KafkaError as exc:  # perhaps our instance id started elsewhere
                    raise await self.membership.explain_start(exc) from exc.__cause__
            self._starting = None
        except BaseException:
            # Failed, or cancelled (a signal during start-up): `run` has no clean-up to
            # reach yet, and a producer left running keeps its connections and tasks.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
                try:
                    await sink.stop()
                finally:
                    await consumer.stop()
            raise

    def _assigned(self) -> None:
        self._handover.assigned()
        self._flow.update(self._consumer)
        self.ready.set()

    async def _close(self) -> None:
        # Leaving the group triggers no revoke callback: forget partitions first. Each step
        # is bounded on its own (the sink bounds its steps): a slow producer must not keep
        # the consumer in the group, holding partitions until its session times out.
        tps = list(self._partitions)
        self._partitions.clear()
        try:
            await self._sink.revoked(tps)
            await self._sink.stop()
        finally:
            # An engine that never had partitions has nothing to hand over, and its stop
            # may wait on a join still in progress: it is not kept waiting for long.
            bound = CLOSE_TIMEOUT_S if self.ready.is_set() else _UNSTARTED_CLOSE_S
            with anyio.move_on_after(bound) as closing:
                await self.membership.close()
            if closing.cancelled_caught:
                # aiokafka's `stop` waits for a join in progress to end (a rebalance waiting
                # for a member gone silent): its connections are closed, not left open.
                with anyio.move_on_after(CLOSE_TIMEOUT_S):
                    await self._consumer._client.close()
            if self._unassigned_at_stop or not self.ready.is_set():  # nothing to come back to
                await self.membership.leave()
            log.info("engine %s closed: %r", self.name, self)

    def _shutdown_grace_s(self) -> float:
        # Unset, the worker fills it in from the catalog (`stream.worker.drain_grace_s`).
        return 120.0 if (grace := self._config.shutdown_grace_s) is None else grace

    async def _drain(self, grace_s: float) -> None:
        before = self.records_released  # given back in this drain: not those of a handover
        abandoned = await drain(self._partitions, grace_s, lambda: self.records_released - before)
        self._rebalancer.abandoned += abandoned  # one count of the calls paid for again
        if not abandoned:
            for partition in self._partitions.values():
                partition.drained = True

    # -- fetch → dispatch → process -----------------------------------------------------

    async def _fetch(self) -> None:
        while not self._stopping.is_set():
            self._listener.raise_error()
            batch: dict[TopicPartition, list[Record]] = {}
            undecodable = False
            # getmany also waits, without a deadline, for a rebalance to finish.
            with anyio.move_on_after(1.0):
                try:
                    batch = await self._consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS)
                except AIOKafkaError as exc:
                    error = translate(exc, self._settings.kafka, "fetching records")
                    raise await self.membership.explain(error) from exc
                except UNDECODABLE:
                    undecodable = True
            if self._stopping.is_set():  # meanwhile: nothing new starts (it stays uncommitted)
                return
            if undecodable:  # outside the deadline: it must not drop what it fetched
                batch = await stand_in_for_undecodable(self._consumer, self._partitions)
            for tp, records in batch.items():
                self._dispatch(tp, records)
            # A slice at a time, its calls out before the next slice starts: 500 records
            # started at once put the first call ~15 ms later.
            while self._flow.start_ready(_SLICE) and not self._stopping.is_set():
                await anyio.lowlevel.checkpoint()
            self._flow.update(self._consumer)

    def _dispatch(self, tp: TopicPartition, records: list[Record]) -> None:
        partition = self._partitions.get(tp)
        if partition is None or partition.revoked:
            # Fetched before our assignment callback set the partition up (or after revoke):
            # put the position back so nothing is skipped.
            seek(self._consumer, tp, records[0].offset)
            return
        for record in records:
            self.records_in += 1
            if partition.offsets.accept(record.offset):
                partition.enqueue(to_keep(record))
                if record.offset < partition.started_before:
                    self.records_redelivered += 1
            else:
                self.records_done += 1  # finished before (per the committed metadata)
                partition.skipped(record.offset)

    def _spawn(self, partition: Partition, record: Record) -> None:
        assert self._task_group is not None
        runner = Runner()
        partition.runners.add(runner)
        runner.handle = self._task_group.start_soon(self._process, runner, partition, record)

    async def _process(self, runner: Runner, partition: Partition, record: Record) -> None:
        """Run `record`, then the next records the flow hands this task: a backlog runs on
        the tasks it has, not on a task per record. The partition of the record running
        knows its runner, and abandoning the partition cancels the runner's task (its own
        cancel scope: no scope per record, ~600 bytes a record in flight)."""
        while True:
            try:
                # Started just before a revoke: wait for the verdict before calling.
                if await partition.kept():
                    # The handler is awaited here, not in a helper: each coroutine level
                    # is a frame per record in flight.
                    if isinstance(record, StandIn):
                        outputs = self._on_error(record, record.error)
                    else:
                        release_of_record.set(partition.release)
                        try:
                            outputs = await self._handler(record)
                        except Exception as exc:
                            failed = self._handler_failed(partition, record, exc)
                            if failed is None:
                                return  # given back: queued again, or for the next owner
                            outputs = failed
                    if await self._deliver(partition, record, outputs):
                        self.records_done += 1
            except BaseException:  # stopped at once: its next owner runs it again
                self._rebalancer.abandoned += 0 if partition.abandoned else 1  # (else counted)
                raise
            finally:
                partition.runners.discard(runner)
                partition.done(record)
                self._flow.finished()
            if self._stopping.is_set():
                return
            following = self._flow.after_record(self._consumer)
            if following is None:
                return
            partition, record = following
            partition.runners.add(runner)

    async def _deliver(
        self, partition: Partition, record: Record, outputs: Sequence[Output]
    ) -> bool:
        """Write the outputs while the partition is surely ours (on probation: once the
        group decides it stays); if it moved, write nothing."""
        while await partition.kept(holding=record.offset):
            if await self._write(partition, record, outputs):
                return True
            if not partition.on_probation:
                return False  # it left while the sink waited (exactly-once: no producer)
        return False

    async def _write(self, partition: Partition, record: Record, outputs: Sequence[Output]) -> bool:
        partition.begin_write(record.offset, time.monotonic())  # how long Kafka keeps us waiting
        try:
            try:
                return await self._sink.write(partition, record.offset, outputs)
            except OutputRejectedError as exc:
                log.error("%s; the record goes to on_error instead", exc)
                return await self._sink.write(partition, record.offset, self._on_error(record, exc))
        finally:
            partition.end_write(record.offset)

    def _handler_failed(
        self, partition: Partition, record: Record, exc: Exception
    ) -> Sequence[Output] | None:
        """The outputs for a record whose handler raised (the stage makes a dead letter); None
        when it gave the record back (`RecordReleased` in a drain or a handover: `give_back`)."""
        if isinstance(exc, RecordReleased) and (self._stopping.is_set() or partition.release.asked):
            self.records_released += 1
            partition.give_back(record)
            return None
        self.handler_errors += 1
        log.error(
            "handler failed on %s[%d]@%d: %s; the record goes to on_error",
            record.topic,
            record.partition,
            record.offset,
            type(exc).__name__,
            exc_info=exc,
        )
        return self._on_error(record, exc)

    # -- commit -------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await anyio.sleep(self._config.commit_interval_s)
            try:
                await self._commit()
            except KafkaError as exc:
                if self._config.guarantee == "exactly-once":
                    if (fence := await self.membership.explain(exc)) is not exc:
                        raise fence from exc
                    raise
                # A rebalance or a Kafka hiccup: the next interval (or the revoke) commits.
                log.warning("commit failed, retrying next interval: %s", exc)

    async def _commit(self, partitions: Iterable[Partition] | None = None) -> None:
        async with self._commit_lock:
            # Partitions on probation are committed by their revoke, and then not ours
            # until the group says so.
            owned = [p for p in self._partitions.values() if not p.revoked]
            chosen = owned if partitions is None else list(partitions)
            started = time.monotonic()
            if chosen and await self._sink.commit(chosen):
                self.commits += 1
                self.last_commit_seconds = time.time()
                if self._on_commit is not None:
                    self._on_commit(time.monotonic() - started)
