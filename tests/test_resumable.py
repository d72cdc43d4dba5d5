"""A resumable copy (replay, redrive) that fails part-way says what it did: its summary,
outcome `failed`, then how to carry on, then the error's one line (the CLI's). One that
fails before its plan was made prints no summary: there is nothing to say yet."""

from __future__ import annotations

import pytest

from stream.backfill.progress import run_resumable
from stream.errors import FencedError, KafkaError


def _run(begun: bool, error: KafkaError | None = None) -> None:
    async def job() -> None:
        raise error or KafkaError("Kafka at 127.0.0.1:9 did not answer in 30 s")

    run_resumable(
        job,
        lambda outcome: f"total 12 copied\na → b: {outcome}",
        "done",
        begun=lambda: begun,
    )


def test_a_run_that_fails_after_its_plan_prints_its_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(KafkaError, match="did not answer"):
        _run(begun=True)
    out, err = capsys.readouterr()
    assert out == "total 12 copied\na → b: failed\n"
    assert err == "stream: what was committed stays; the same command again carries on\n"


def test_a_run_that_fails_before_its_plan_prints_only_the_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(KafkaError):
        _run(begun=False)
    assert capsys.readouterr() == ("", "")


def test_a_run_another_took_over_is_not_told_to_run_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Fenced by a newer run of the same copy: running it again now would fence that one;
    its error line says to let it finish."""
    with pytest.raises(FencedError):
        _run(begun=True, error=FencedError("Kafka fenced this `stream replay` …"))
    out, err = capsys.readouterr()
    assert out.endswith(": failed\n") and err == ""
