"""Prompts and answers never reach the logs, at any level, unless STREAM_LOG_CONTENT=true;
secrets never do. aiokafka at DEBUG logs what it sends: the worker's logs must not."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka.protocol.admin import SaslAuthenticateRequest_v0

from stream import logs, topics
from stream.config import Settings
from stream.devtools.simulator import SimConfig, Simulator
from tests.kit.requests import request, send, terminal
from tests.kit.workers import simulator_env, worker_process

PROMPT = "PROMPT-MARKER-do-not-log-7f3a"
PASSWORD = "plain-FAKE-password-1234"


@pytest.mark.anyio
async def test_a_debug_worker_logs_no_prompt_and_no_answer(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    await topics.apply(settings, await topics.plan(settings))
    log = tmp_path / "worker.log"
    async with (
        Simulator(SimConfig()) as sim,
        worker_process(simulator_env(env, sim, STREAM_LOG_LEVEL="DEBUG"), log),
    ):
        value = request("log-1", "deepseek-v3-0324-syn", PROMPT, metadata={"m": PROMPT})
        await send(settings, [("log-1", value), ("log-2", PROMPT.encode())])
        found = await terminal(settings, 2)
    output = log.read_text()
    answer = found["log-1"][1]["content"]
    assert answer and found["log-2"][1]["reason"] == "invalid_json"
    assert "Sending batch to" in output  # aiokafka's producer logged at DEBUG, no record in it
    for line in output.splitlines():
        orjson.loads(line)
    assert PROMPT not in output
    assert answer not in output


@pytest.fixture
def root_logging() -> Iterator[None]:
    """`logs.configure` replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    aiokafka_level = logging.getLogger("aiokafka").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(aiokafka_level)


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize("content", [False, True])
def test_aiokafka_requests_and_records_are_redacted(
    content: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    logs.configure("DEBUG", json=True, content=content)
    payload = b"\x00user\x00" + PASSWORD.encode()
    conn = logging.getLogger("aiokafka.conn")
    conn.debug("Request to %s:%d %d: %s", "h", 9092, 7, SaslAuthenticateRequest_v0(payload))
    producer = logging.getLogger("aiokafka.producer.producer")
    producer.debug("Sending (key=%s value=%s) to %s", b"k", PROMPT.encode(), "topic-0")
    output = err.getvalue()
    assert "<SaslAuthenticateRequest_v0>" in output and PASSWORD not in output
    assert (PROMPT in output) is content  # record content only when asked for
