"""A stopping worker gives back the calls still waiting to go out (`RecordReleased`), so its
drain waits only for calls that are out. First the client, over real HTTP against a
provider of the test's own whose answers wait on events the test sets: a call waiting for
a slot, for the spend limit, or in a back-off after a 429 is withdrawn and never sent; a
call whose billed answer it could not use is not (running its record again would pay
again). Then end to end on the broker and the simulator: a worker held by its spend limit
stops in seconds, not when the window frees room, and the next worker answers the rest,
each request once, none paid twice, none counted as perhaps paid twice. And the commit
note that tells a next owner what was started leaves out records given back."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web
from aiokafka import ConsumerRecord, TopicPartition

from stream import topics
from stream.devtools.faults import Latency
from stream.devtools.simulator import SimConfig, Simulator
from stream.engine.offsets import PartitionOffsets, split_notes
from stream.engine.partitions import Partition
from stream.errors import RecordReleased
from stream.release import Release
from stream.release import current as release_of_record
from stream.spend import Budget
from stream.stages import Topics
from stream.worker import Worker
from tests.kit import eventually
from tests.kit.kafka import committed, produce, read_all
from tests.kit.provider import answer, ask, client_of, priced
from tests.kit.requests import request
from tests.kit.workers import priced_catalog, simulated_settings

pytestmark = pytest.mark.anyio

GLM = priced("glm")
USAGE = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}


async def _released(call: Awaitable[Any]) -> None:
    with anyio.fail_after(5), pytest.raises(RecordReleased):
        await call


async def test_a_call_waiting_for_a_slot_is_withdrawn_and_never_sent() -> None:
    out, go = anyio.Event(), anyio.Event()

    async def handle(text: str) -> web.StreamResponse:
        out.set()
        await go.wait()
        return web.json_response(answer(USAGE, content=f"re: {text}"))

    async with client_of(handle, max_connections=1, initial_concurrency=1) as (client, calls):
        answers: list[str] = []
        async with anyio.create_task_group() as group:

            async def first() -> None:
                answers.append((await client.complete(GLM, ask("out"))).content)

            group.start_soon(first)
            await out.wait()
            group.start_soon(_released, client.complete(GLM, ask("waiting")))
            await anyio.wait_all_tasks_blocked()
            assert client.limiter(GLM).snapshot().waiting == 1
            assert client.withdraw_waiting() == 1
            # One that would wait from now on gives its record back at once too.
            await _released(client.complete(GLM, ask("later")))
            go.set()  # the call that was out runs on and is answered
    assert answers == ["re: out"]
    assert calls == ["out"]


async def test_a_call_waiting_for_the_spend_limit_is_withdrawn_and_never_sent() -> None:
    # A model's first call runs alone under a spend limit: the second waits for it.
    budget = Budget("live", limit_usd=1.0, window_s=60)
    out, go = anyio.Event(), anyio.Event()

    async def handle(text: str) -> web.StreamResponse:
        out.set()
        await go.wait()
        return web.json_response(answer(USAGE))

    async with client_of(handle) as (client, calls):
        async with anyio.create_task_group() as group:
            group.start_soon(partial(client.complete, GLM, ask("first"), spend=budget))
            await out.wait()
            group.start_soon(_released, client.complete(GLM, ask("second"), spend=budget))
            await anyio.wait_all_tasks_blocked()
            assert client.withdraw_waiting() == 1
            go.set()
    assert calls == ["first"]
    snapshot = budget.snapshot()
    assert snapshot.held_usd == 0.0 and snapshot.spent_usd > 0  # the first settled alone


async def test_a_call_backing_off_after_a_429_is_withdrawn() -> None:
    async def handle(text: str) -> web.StreamResponse:
        return web.json_response({"error": {}}, status=429, headers={"Retry-After": "10"})

    async with client_of(handle) as (client, calls):
        async with anyio.create_task_group() as group:
            group.start_soon(_released, client.complete(GLM, ask("x"), deadline=time.time() + 30))

            async def backing_off() -> bool:  # its 429 read: the model's calls pause 10 s
                return client.limiter(GLM).snapshot().paused_for_s > 0

            await eventually(backing_off)
            await anyio.wait_all_tasks_blocked()
            assert client.withdraw_waiting() == 1
    assert calls == ["x"]  # a 429 is not billed: the next owner's call is the only paid one


async def test_a_call_with_a_billed_answer_is_not_withdrawn() -> None:
    # Its first answer is a 200 with usage but no content (billed, unusable): the retry
    # that follows is the call's own, and giving the record back would pay for it again.
    out, go = anyio.Event(), anyio.Event()
    answers = iter([answer(USAGE, content=""), answer(USAGE, content="second try")])

    async def handle(text: str) -> web.StreamResponse:
        out.set()
        await go.wait()
        return web.json_response(next(answers))

    async with client_of(handle) as (client, calls):
        done: list[str] = []
        async with anyio.create_task_group() as group:

            async def call() -> None:
                done.append((await client.complete(GLM, ask("x"))).content)

            group.start_soon(call)
            await out.wait()
            client.withdraw_waiting()  # the stop comes while the first attempt is out
            go.set()
    assert done == ["second try"]
    assert calls == ["x", "x"]


async def test_the_release_of_a_partition_handed_over_ends_only_its_own_waits() -> None:
    """A handover asks its partition's `Release`: the calls of that partition's records
    waiting for a slot give their records back and are never sent, as is one that would
    wait from then on; another partition's waiting call stays in line and goes out."""
    out, go = anyio.Event(), anyio.Event()

    async def handle(text: str) -> web.StreamResponse:
        out.set()
        await go.wait()
        return web.json_response(answer(USAGE, content=f"re: {text}"))

    leaving, staying = Release(), Release()

    async def on(release: Release, text: str) -> str:
        release_of_record.set(release)  # as the engine does for the record it runs
        return (await client.complete(GLM, ask(text))).content

    async with client_of(handle, max_connections=1, initial_concurrency=1) as (client, calls):
        answers: list[str] = []
        async with anyio.create_task_group() as group:

            async def call(release: Release, text: str) -> None:
                answers.append(await on(release, text))

            group.start_soon(call, staying, "out")
            await out.wait()
            group.start_soon(_released, on(leaving, "waiting"))
            group.start_soon(call, staying, "stays in line")
            await anyio.wait_all_tasks_blocked()
            assert client.limiter(GLM).snapshot().waiting == 2
            assert leaving.ask() == 1
            await _released(on(leaving, "later"))
            go.set()
    assert sorted(answers) == ["re: out", "re: stays in line"]
    assert calls == ["out", "stays in line"]


def test_a_record_given_back_waits_at_the_front_of_its_key_and_runs_again_if_it_stays() -> None:
    """Given back in a handover, a record is unfinished: back at the front of its
    partition's queue, its key still busy (the next of its key does not overtake it), not
    noted as started; if the partition stays after all, it is the next to start."""
    tp = TopicPartition("in", 0)
    partition = Partition(tp, PartitionOffsets(0), low_priority=False, key_ordering=True)
    first, second = (
        ConsumerRecord(tp.topic, 0, offset, 0, 0, b"k", b"{}", None, 1, 2, []) for offset in (0, 1)
    )
    for record in (first, second):
        assert partition.offsets.accept(record.offset)
        partition.enqueue(record)
    assert partition.start_next() is first
    partition.give_back(first)
    partition.done(first)  # the engine's clean-up after the run: nothing more to release
    assert partition.in_flight == 0 and partition.idle.is_set()
    assert partition.queued == 2 and partition.released == {0}
    assert "started" not in split_notes(partition.position()[1])[1]
    assert partition.start_next() is first  # its key's order holds
    assert partition.released == set() and partition.queued == 1
    partition.done(first)
    assert partition.start_next() is second


def test_records_given_back_at_the_top_are_not_noted_as_started() -> None:
    partition = Partition(
        TopicPartition("in", 0), PartitionOffsets(0), low_priority=False, key_ordering=False
    )
    for offset in range(6):
        assert partition.offsets.accept(offset)
    partition.started_high = 6
    partition.offsets.finish(0)
    partition.offsets.finish(2)
    partition.released.update({3, 4, 5})
    # 1 ran and was abandoned: perhaps paid (2 is finished: the next owner skips it)
    assert split_notes(partition.position()[1])[1]["started"] == "2"
    partition.released.add(1)  # all that is not finished was given back: nothing to note
    assert "started" not in split_notes(partition.position()[1])[1]


# --- end to end -------------------------------------------------------------------------

REQUESTS = 40
MODEL = "deepseek-v3-0324-syn"


@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_a_worker_held_by_its_spend_limit_stops_at_once_and_loses_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    catalog = priced_catalog(tmp_path)
    async with Simulator(SimConfig(latency=Latency("fixed", 0.05))) as sim:
        base = {**env, "STREAM_CATALOG_FILE": str(catalog), "STREAM_COMMIT_INTERVAL_S": "0.2"}
        # Room for a few calls in an hour: the rest wait, started, for the spend limit.
        held = simulated_settings(
            {**base, "STREAM_SPEND_LIMIT_USD": "0.0001", "STREAM_SPEND_WINDOW": "1h"},
            sim,
            max_in_flight=16,
        )
        await topics.apply(held, await topics.plan(held))
        names = Topics.of(held)
        asked = [f"w-{i:03d}" for i in range(REQUESTS)]
        await produce(held, names.requests, [request(r, MODEL, f"Q {r}?") for r in asked])

        first = Worker(held, ("primary",))
        async with anyio.create_task_group() as group:
            group.start_soon(first.run)
            await first.started.wait()

            assert first.spend is not None
            budget = first.spend.live

            def spent_out() -> bool:
                # Started records, and the room spent for the hour: something was paid, no
                # admitted call is left unsettled (one admitted reaches the simulator a moment
                # later, on a loaded machine seconds later), and the rest wait for room.
                engine, spent = first.engines[0].snapshot(), budget.snapshot()
                return (
                    engine.in_flight > 1
                    and spent.spent_usd > 0
                    and spent.held_usd == 0
                    and budget.holds(names.requests) is not None
                    and sim.stats()["in_flight"] == 0
                )

            async def waiting() -> bool:
                # …and still so a moment later: a waiter woken by the last settle has looked
                # for room again by then.
                before = sim.stats()["requests"]
                if not spent_out():
                    return False
                await anyio.sleep(0.3)
                return spent_out() and sim.stats()["requests"] == before

            await eventually(waiting, timeout_s=60)
            paid_first = sim.stats()["requests"]
            stopped = time.monotonic()
            first.stop()
        took = time.monotonic() - stopped
        released = first.engines[0].snapshot().records_released
        assert released > 0
        assert took < 30, f"the drain waited {took:.0f} s for calls that never went out"
        assert sim.stats()["requests"] == paid_first  # none of them was sent on the way out

        group_id = first.engines[0].group_id
        offsets = await committed(held, group_id, names.requests)
        done_first = len(await read_all(held, names.results))
        assert sum(offset for offset, _ in offsets.values()) <= REQUESTS - released

        # The next worker, without the limit, answers the rest.
        free = simulated_settings(base, sim, max_in_flight=16)
        second = Worker(free, ("primary",))
        async with anyio.create_task_group() as group:
            group.start_soon(second.run)
            results: list[dict[str, Any]] = []

            async def all_done() -> bool:
                results[:] = [orjson.loads(r.value) for r in await read_all(free, names.results)]
                return len(results) >= REQUESTS

            await eventually(all_done, timeout_s=90)
            second.stop()
    assert done_first < REQUESTS
    assert sorted(r["request_id"] for r in results) == asked  # each once
    assert sim.stats()["paid_twice"] == 0
    # Given back unpaid, not "started": the next owner counts none as perhaps paid twice.
    assert second.engines[0].snapshot().records_redelivered == 0
