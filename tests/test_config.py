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
        (
            {"STREAM_REBALANCE_TIMEOUT_MS": "5000", "STREAM_SESSION_TIMEOUT_MS": "1000"},
            "STREAM_REBALANCE_TIMEOUT_MS",
        ),
        ({"STREAM_INSTANCE_ID": "worker 1"}, "STREAM_INSTANCE_ID"),
        ({"STREAM_INSTANCE_ID": "w" * 241}, "STREAM_INSTANCE_ID"),
        ({"STREAM_INSTANCE_ID": ".."}, "STREAM_INSTANCE_ID"),
        ({"STREAM_SHUTDOWN_GRACE_S": "-1"}, "STREAM_SHUTDOWN_GRACE_S"),
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


def test_instance_id_and_shutdown_grace_are_unset_unless_given() -> None:
    plain = Settings.from_env({})
    assert (plain.engine.instance_id, plain.engine.shutdown_grace_s) == (None, None)
    given = Settings.from_env(
        {"STREAM_INSTANCE_ID": "predictions-0", "STREAM_SHUTDOWN_GRACE_S": "45"}
    )
    assert (given.engine.instance_id, given.engine.shutdown_grace_s) == ("predictions-0", 45.0)
    # the longest id Kafka takes once an engine appends "-fallback"
    longest = "a" * 240
    assert Settings.from_env({"STREAM_INSTANCE_ID": longest}).engine.instance_id == longest
