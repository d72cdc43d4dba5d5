"""Secrets never leave the process: not in logs, records, metrics, reprs or exceptions.

A worker runs with known fake keys against providers that reject them with a 401 that
echoes the presented key back (as some real providers do), so provider error text — which
the pipeline does carry into fallback records and dead letters — holds the key. Then every
place a key could surface is scanned for any 16-character slice of any secret.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable

import httpx
import pytest

from stream import logs
from stream.catalog import Catalog, Model, load_catalog
from stream.config import Settings
from stream.devtools.simulator import SimConfig, Simulator
from stream.errors import ProviderError
from stream.providers import ProviderClient
from stream.stages import Topics
from stream.worker import Worker
from tests.kit.kafka import read_all
from tests.kit.requests import request, send, terminal
from tests.kit.workers import BOTH, worker_on

pytestmark = pytest.mark.anyio

SYNTHETIC_KEY = "sk-syn-FAKE-" + "a1b2c3d4" * 4
# Long, like a JWT-style key: longer than any cut the client makes to provider messages,
# so a message truncated before it is scrubbed would keep a prefix of the key.
TOGETHER_KEY = "tgp_v1_FAKE." + "".join(f"{i:03d}Zx9Yw8" for i in range(40))
SASL_PASSWORD = "sasl-FAKE-password-9f8e7d6c5b4a"
SECRETS = (SYNTHETIC_KEY, TOGETHER_KEY, SASL_PASSWORD)


def _fragments(secret: str, width: int = 16) -> set[str]:
    return {secret[i : i + width] for i in range(0, max(1, len(secret) - width + 1), 4)}


FRAGMENTS = set().union(*(_fragments(s) for s in SECRETS))


def leaks(texts: Iterable[str]) -> list[str]:
    """The texts holding any slice of a secret (shortened, so a failure stays readable)."""
    return [t[:300] for t in texts if any(f in t for f in FRAGMENTS)]


def _env(env: dict[str, str], synthetic: Simulator, together: Simulator) -> dict[str, str]:
    return {
        **env,
        "SYNTHETIC_API_KEY": SYNTHETIC_KEY,
        "SYNTHETIC_BASE_URL": synthetic.url,
        "TOGETHER_API_KEY": TOGETHER_KEY,
        "TOGETHER_BASE_URL": together.url,
        "STREAM_SYNTHETIC_MAX_RETRIES": "1",
        "STREAM_TOGETHER_MAX_RETRIES": "1",
        # Carried (not used: the test broker is PLAINTEXT), so it must still never show.
        "STREAM_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "STREAM_LOG_LEVEL": "DEBUG",
    }


def _formatted(records: Iterable[logging.LogRecord]) -> list[str]:
    """Each log record as the worker writes it (JSON, traceback included) and raw."""
    formatter = logs.JsonFormatter()
    return [text for r in records for text in (formatter.format(r), repr(vars(r)))]


async def test_no_secret_in_logs_records_metrics_reprs_or_errors(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Both providers want other keys: every call is a 401 that echoes ours back.
    async with (
        Simulator(SimConfig(api_key="the-right-synthetic-key")) as synthetic,
        Simulator(SimConfig(api_key="the-right-together-key")) as together,
    ):
        settings = Settings.from_env(_env(env, synthetic, together))
        cases = {
            "s-mapped": request("s-mapped", "deepseek-r1-0528-syn"),  # → fallback_failed
            "s-unmapped": request("s-unmapped", "glm-4.6-syn"),  # → no_fallback
            "s-garbage": b"\xff" + SYNTHETIC_KEY.encode()[:4],  # → invalid_encoding
        }
        async with worker_on(Worker(settings, BOTH)) as worker, httpx.AsyncClient() as http:
            await send(settings, list(cases.items()))
            found = await terminal(settings, len(cases))
            metrics = (await http.get(f"http://127.0.0.1:{worker.port}/metrics")).text
            texts = [metrics, repr(worker), repr(settings), str(settings)]
            texts += [repr(engine) for engine in worker.engines]
        texts += await _provider_errors(settings)
    names = Topics.of(settings)
    for topic in (names.results, names.fallback, names.dead_letter):
        records = await read_all(settings, topic)
        texts += [r.value.decode("utf-8", "replace") for r in records]
        texts += [repr(r.headers) for r in records]

    assert {rid: v["reason"] for rid, (_, v, _) in found.items()} == {
        "s-mapped": "fallback_failed",
        "s-unmapped": "no_fallback",
        "s-garbage": "invalid_encoding",
    }
    letter = found["s-mapped"][1]
    # The providers did echo the keys back: the scan below is not vacuous.
    assert "Incorrect API key provided: [redacted]" in letter["failures"][0]["message"]
    assert letter["failures"][1]["status"] == 401
    texts += _formatted(caplog.records)
    assert len(caplog.records) > 20  # DEBUG logging did run
    assert leaks(texts) == []


async def _provider_errors(settings: Settings) -> list[str]:
    """The full text of the errors a client raises on a 401 echo and a transport failure."""
    catalog = load_catalog(settings)
    texts: list[str] = []
    for provider, model in (("synthetic", "glm-4.6-syn"), ("together", "deepseek-r1")):
        client = ProviderClient(getattr(settings, provider))
        async with client:
            try:
                await client.complete(_model(catalog, model), [{"role": "user", "content": "hi"}])
            except ProviderError as exc:
                texts += [str(exc), repr(exc), repr(vars(exc))]
                texts += traceback.format_exception(exc)
            texts.append(repr(client))
    assert len(texts) > 4
    return texts


def test_settings_never_show_secrets_even_from_files(tmp_path: object, env: dict[str, str]) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "together").write_text(TOGETHER_KEY + "\n")
    (folder / "sasl").write_text(SASL_PASSWORD + "\n")
    settings = Settings.from_env(
        {
            **env,
            "SYNTHETIC_API_KEY": SYNTHETIC_KEY,
            "TOGETHER_API_KEY_FILE": str(folder / "together"),
            "STREAM_KAFKA_SASL_PASSWORD_FILE": str(folder / "sasl"),
        }
    )
    assert settings.together.api_key.reveal() == TOGETHER_KEY  # read, and trimmed
    assert settings.kafka.sasl_password.reveal() == SASL_PASSWORD
    assert leaks([repr(settings), str(settings), repr(vars(settings))]) == []


def _model(catalog: Catalog, model_id: str) -> Model:
    model = catalog.get(model_id)
    assert model is not None
    return model
