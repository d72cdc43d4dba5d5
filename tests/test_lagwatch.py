"""`stream lag --watch` goes on through readings Kafka fails, until it is told to stop (the
coordinator killed on a three-broker cluster: tests/test_cluster_lag.py)."""

from __future__ import annotations

import signal

import anyio
import orjson
import pytest
from aiokafka import TopicPartition

from stream.config import Settings
from stream.devtools.cluster import free_ports
from tests.kit import eventually
from tests.kit.kafka import commit, create_topic, produce
from tests.kit.lag import stamped, watching

pytestmark = pytest.mark.anyio


async def test_watch_shows_a_kafka_that_is_down_in_its_frame_and_keeps_trying(
    env: dict[str, str],
) -> None:
    nobody = f"127.0.0.1:{free_ports(1)}"  # a port nothing listens on
    down = {**env, "KAFKA_BOOTSTRAP_SERVERS": nobody}
    async with watching(down, "--interval", "0.2") as watch:

        async def failed_twice() -> bool:
            assert watch.process.returncode is None, watch.err  # still watching
            return sum("reading failed" in line for line in watch.out) >= 2

        await eventually(failed_twice)
        frame = next(line for line in watch.out if "reading failed" in line)
        assert f"cannot reach Kafka at {nobody}" in frame and "trying again in 0.2 s" in frame
        assert "\x1b" not in "".join(watch.out)  # a pipe gets readings, no terminal codes
        watch.process.send_signal(signal.SIGINT)  # Ctrl-C: the way out
        with anyio.fail_after(30):
            await watch.process.wait()
    assert watch.process.returncode == 0
    assert not any("Traceback" in line for line in watch.err), watch.err


async def test_watch_json_keeps_stdout_one_list_a_line_and_reports_failures_on_stderr(
    settings: Settings, env: dict[str, str]
) -> None:
    topic = await create_topic(settings, "lag.watch", 1)
    await produce(settings, topic, stamped(0, [0, 0, 0]))
    group = settings.group("watch")
    await commit(settings, group, {TopicPartition(topic, 0): 1})
    async with watching(env, "--group", group, "--json", "--interval", "0.2") as watch:

        async def two_frames() -> bool:
            return len(watch.out) >= 2

        await eventually(two_frames)
    rows = [orjson.loads(line) for line in watch.out if line]
    assert all(frame[0]["lag"] == 2 for frame in rows)
    assert watch.err == [], watch.err


async def test_a_one_shot_look_cut_short_says_so_and_is_not_ok(env: dict[str, str]) -> None:
    """Ctrl-C before a reading: exit 130 and a line, not exit 0 with nothing (which a
    script takes for "no lag")."""
    import sys

    accepted = anyio.Event()

    async def hang(stream: anyio.abc.SocketStream) -> None:
        accepted.set()
        async with stream:
            await anyio.sleep_forever()  # a broker that never answers

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        hung = {**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listener.serve, hang)
            process = await anyio.open_process([sys.executable, "-m", "stream", "lag"], env=hung)
            try:
                with anyio.fail_after(30):
                    await accepted.wait()  # sampling: its signal handling is in place
                process.send_signal(signal.SIGINT)
                with anyio.fail_after(30):
                    await process.wait()
                assert process.stderr is not None
                err = (await process.stderr.receive()).decode()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            tasks.cancel_scope.cancel()
    assert process.returncode == 130, err
    assert (
        "stream: interrupted before the lag reading was complete" in err and "Traceback" not in err
    )
