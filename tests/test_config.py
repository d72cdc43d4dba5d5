from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stream.config import Secret, Settings
from stream.errors import ConfigError


def test_defaults_are_sane() -> None:
    settings = Settings.from_env({})
    assert settings.engine.guarantee == "at-least-once"
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.synthetic.base_url == "https://api.synthetic.new/openai/v1"
    assert not settings.together.api_key


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"STREAM_MAX_IN_FLIGHT": "lots"}, "STREAM_MAX_IN_FLIGHT"),
        ({"STREAM_MAX_IN_FLIGHT": "0"}, "STREAM_MAX_IN_FLIGHT"),
        ({"STREAM_GUARANTEE": "maybe-once"}, "STREAM_GUARANTEE"),
        ({"STREAM_LOG_CONTENT": "perhaps"}, "STREAM_LOG_CONTENT"),
        ({"SYNTHETIC_BASE_URL": "api.synthetic.new"}, "SYNTHETIC_BASE_URL"),
        (
            {"STREAM_MAX_IN_FLIGHT": "10", "STREAM_MAX_IN_FLIGHT_PER_PARTITION": "20"},
            "STREAM_MAX_IN_FLIGHT_PER_PARTITION",
        ),
        ({"STREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "STREAM_KAFKA_SASL_MECHANISM"),
        ({"STREAM_REVOKE_GRACE_S": "300"}, "STREAM_REBALANCE_TIMEOUT_MS"),
        ({"TOGETHER_API_KEY": "a", "TOGETHER_API_KEY_FILE": "/x"}, "TOGETHER_API_KEY_FILE"),
        ({"TOGETHER_API_KEY_FILE": "/nonexistent/key"}, "TOGETHER_API_KEY_FILE"),
        ({"STREAM_CATALOG_FILE": "/nonexistent.toml"}, "STREAM_CATALOG_FILE"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        Settings.from_env(env)


def test_secret_from_file_never_shows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = tmp_path / "key"
    key.write_text("sk-very-secret-123\n")
    settings = Settings.from_env({"TOGETHER_API_KEY_FILE": str(key)})
    assert settings.together.api_key.reveal() == "sk-very-secret-123"
    logging.getLogger("test").warning("settings %s %r", settings, settings)
    for text in (repr(settings), str(settings), caplog.text, str(settings.together)):
        assert "sk-very-secret" not in text
    assert Secret("x") == Secret("x") and not Secret("")


def test_config_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    file = tmp_path / "stream.toml"
    file.write_text(
        'STREAM_MAX_IN_FLIGHT = 64\nSTREAM_TOPIC_PREFIX = "dev."\nSTREAM_LOG_CONTENT = true\n'
    )
    settings = Settings.from_env({"STREAM_CONFIG_FILE": str(file), "STREAM_TOPIC_PREFIX": "x."})
    assert settings.engine.max_in_flight == 64
    assert settings.log_content is True
    assert settings.topic("predictions.requests") == "x.predictions.requests"


def test_bad_config_file_is_one_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "stream.toml"
    file.write_text("STREAM_MAX_IN_FLIGHT = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.from_env({"STREAM_CONFIG_FILE": str(file)})


def test_variables_lists_what_users_look_for() -> None:
    names = Settings.variables()
    for name in (
        "KAFKA_BOOTSTRAP_SERVERS",
        "SYNTHETIC_API_KEY",
        "SYNTHETIC_BASE_URL",
        "TOGETHER_API_KEY",
        "TOGETHER_BASE_URL",
        "STREAM_GUARANTEE",
        "STREAM_MAX_IN_FLIGHT",
        "SYNTHETIC_API_KEY_FILE",
    ):
        assert name in names
    assert all(
        n.startswith("STREAM_") or n.split("_")[0] in {"KAFKA", "SYNTHETIC", "TOGETHER"}
        for n in names
    )


def test_a_max_request_size_the_fallback_topic_cannot_hold_is_refused() -> None:
    with pytest.raises(ConfigError, match="STREAM_MAX_REQUEST_BYTES"):
        Settings.from_env({"STREAM_MAX_REQUEST_BYTES": "1048588"})
    assert Settings.from_env({"STREAM_MAX_REQUEST_BYTES": "1000000"}).max_request_bytes == 1_000_000


def test_revoke_grace_follows_a_lowered_rebalance_timeout() -> None:
    short = {"STREAM_REBALANCE_TIMEOUT_MS": "20000", "STREAM_SESSION_TIMEOUT_MS": "6000"}
    # half of what the timeout leaves after the 10 s kept for closing
    assert Settings.from_env(short).engine.revoke_grace_s == 5.0
    assert Settings.from_env({}).engine.revoke_grace_s == 55.0
    explicit = Settings.from_env({**short, "STREAM_REVOKE_GRACE_S": "8"})
    assert explicit.engine.revoke_grace_s == 8.0


def test_a_revoke_grace_that_leaves_no_time_to_close_is_refused() -> None:
    # 15 s of grace fits in a 20 s rebalance timeout, but closing the partitions' producers
    # afterwards takes up to 10 s more: the group would drop the worker while it closes.
    short = {"STREAM_REBALANCE_TIMEOUT_MS": "20000", "STREAM_SESSION_TIMEOUT_MS": "6000"}
    with pytest.raises(ConfigError, match="to close"):
        Settings.from_env({**short, "STREAM_REVOKE_GRACE_S": "15"})
