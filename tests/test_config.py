from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
        ({"KAFKA_BOOTSTRAP_SERVERS": "a:b:c"}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "broker"}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "h:0"}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "h:99999"}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "::1:9092"}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"STREAM_COMMIT_INTERVAL_S": "inf"}, "STREAM_COMMIT_INTERVAL_S"),
        ({"STREAM_SHUTDOWN_GRACE_S": "nan"}, "STREAM_SHUTDOWN_GRACE_S"),
        ({"STREAM_TOGETHER_BREAKER_COOLDOWN_S": "-inf"}, "STREAM_TOGETHER_BREAKER_COOLDOWN_S"),
        # a typo's magnitude, not a choice: refused with the most that is taken
        ({"STREAM_COMMIT_INTERVAL_S": "1e23"}, "STREAM_COMMIT_INTERVAL_S must be at most 3600"),
        ({"STREAM_SHUTDOWN_GRACE_S": "1e23"}, "STREAM_SHUTDOWN_GRACE_S must be at most 86400"),
        ({"STREAM_SYNTHETIC_TIMEOUT_S": "9e9"}, "STREAM_SYNTHETIC_TIMEOUT_S"),
        ({"STREAM_TOGETHER_CONNECT_TIMEOUT_S": "1e5"}, "STREAM_TOGETHER_CONNECT_TIMEOUT_S"),
        ({"STREAM_SPEND_WINDOW": "1000d"}, "STREAM_SPEND_WINDOW must be at most 31d"),
        ({"STREAM_TOPIC_PREFIX": "ünï."}, "STREAM_TOPIC_PREFIX"),
        ({"STREAM_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "STREAM_KAFKA_SSL_CAFILE"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"STREAM_KAFKA_SASL_MECHANISM": "GSSAPI"},
            "one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or unset",
        ),
        ({"SYNTHETIC_BASE_URL": "http://"}, "URL with a host, such as https://api.synthetic.new"),
        ({"SYNTHETIC_BASE_URL": "http:// spaces /v1"}, "URL with a host"),
        ({"TOGETHER_BASE_URL": "ftp://host/v1"}, "an http:// or https:// URL"),
        # 0 is refused too: "at least 0" was not what would be right
        ({"STREAM_SPEND_LIMIT_USD": "-1"}, r"STREAM_SPEND_LIMIT_USD must be above 0 \(got -1\)"),
        ({"STREAM_SPEND_LIMIT_USD": "inf"}, "must be a finite number"),
    ],
)
def test_bad_settings_say_what_would_be_right(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
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


_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


def _kafka_accepts(value: str) -> bool:
    """Kafka's JoinGroupRequest.validateGroupInstanceId, written out plainly."""
    return value not in ("", ".", "..") and len(value) <= 249 and all(c in _ID_CHARS for c in value)


@given(
    st.one_of(
        st.text(st.sampled_from(_ID_CHARS), min_size=1, max_size=260),
        st.text(min_size=1, max_size=20),
    )
)
def test_instance_ids_are_taken_exactly_when_kafka_would(value: str) -> None:
    stripped = value.strip()
    if not stripped:
        assert Settings.from_env({"STREAM_INSTANCE_ID": value}).engine.instance_id is None
    elif _kafka_accepts(stripped) and _kafka_accepts(f"{stripped}-fallback"):
        # each engine joins as <id>-<stage>: the id must leave room for the stage
        assert Settings.from_env({"STREAM_INSTANCE_ID": value}).engine.instance_id == stripped
    else:
        with pytest.raises(ConfigError, match="STREAM_INSTANCE_ID .* not a valid Kafka group"):
            Settings.from_env({"STREAM_INSTANCE_ID": value})


def test_instance_id_examples() -> None:
    assert Settings.from_env({}).engine.instance_id is None
    pod = Settings.from_env({"STREAM_INSTANCE_ID": "prediction-stream-primary-0"})
    assert pod.engine.instance_id == "prediction-stream-primary-0"
    for bad in (".", "..", "a/b", "x" * 250, "pod 0"):
        with pytest.raises(ConfigError, match="STREAM_INSTANCE_ID"):
            Settings.from_env({"STREAM_INSTANCE_ID": bad})


def test_an_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    """compose's `${NAME:-}` and templating tools define "" when they mean unset."""
    key = tmp_path / "key"
    key.write_text("from-file\n")
    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "",
            "STREAM_GUARANTEE": " ",
            "SYNTHETIC_BASE_URL": "",
            "SYNTHETIC_API_KEY": "",  # with the _FILE variant: not "both"
            "SYNTHETIC_API_KEY_FILE": str(key),
            "STREAM_SHUTDOWN_GRACE_S": "",
        }
    )
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.engine.guarantee == "at-least-once"
    assert settings.synthetic.base_url == "https://api.synthetic.new/openai/v1"
    assert settings.synthetic.api_key.reveal() == "from-file"
    assert settings.engine.shutdown_grace_s is None


def test_an_empty_variable_does_not_erase_what_the_config_file_sets(tmp_path: Path) -> None:
    """compose's `${STREAM_SPEND_LIMIT_USD:-}` over a file that sets a limit: the limit
    holds (it ran with none)."""
    file = tmp_path / "stream.toml"
    file.write_text('STREAM_SPEND_LIMIT_USD = 0.5\nSTREAM_GUARANTEE = "exactly-once"\n')
    settings = Settings.from_env(
        {"STREAM_CONFIG_FILE": str(file), "STREAM_SPEND_LIMIT_USD": "", "STREAM_GUARANTEE": " "}
    )
    assert settings.spend.limit_usd == 0.5
    assert settings.engine.guarantee == "exactly-once"


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("STREAM_GAURANTEE", "STREAM_GUARANTEE"),
        ("STREAM_SPEND_LIMIT_US", "STREAM_SPEND_LIMIT_USD"),
        ("STREAM_MAX_INFLIGHT", "STREAM_MAX_IN_FLIGHT"),
    ],
)
def test_a_misspelt_variable_is_refused_with_the_setting_it_resembles(
    name: str, meant: str
) -> None:
    """A typo in the environment must not run a worker with no spend limit, or at-least-once
    where exactly-once was meant, as a typo in the config file already cannot."""
    with pytest.raises(ConfigError, match=f"{name} is not a setting \\(did you mean {meant}\\?\\)"):
        Settings.from_env({name: "5"})


def test_other_variables_that_share_the_prefix_are_left_alone() -> None:
    settings = Settings.from_env(
        {"STREAM_CACHE_DIR": "/tmp/x", "STREAM_PLATFORM_REGION": "eu", "STREAM_GAURANTEE": ""}
    )
    assert settings.engine.guarantee == "at-least-once"


def test_shutdown_grace_is_a_cap_when_set_and_follows_the_catalog_when_not() -> None:
    from stream.catalog import Model, build_catalog, load_catalog
    from stream.worker import COMMIT_AND_CLOSE_S, drain_grace_s, stop_grace_s

    default = Settings.from_env({})
    assert default.engine.shutdown_grace_s is None
    catalog = load_catalog(default)
    assert drain_grace_s(default, catalog) == 120.0  # the reasoning models' timeout
    assert stop_grace_s(default, catalog) == 120.0 + COMMIT_AND_CLOSE_S
    slow = Model(id="slow", provider="synthetic", api_model="hf:slow", timeout_s=300.0)
    longer = build_catalog({**catalog.models, "slow": slow}, catalog.fallbacks)
    assert drain_grace_s(default, longer) == 300.0
    capped = Settings.from_env({"STREAM_SHUTDOWN_GRACE_S": "45"})
    assert drain_grace_s(capped, longer) == 45.0
    assert drain_grace_s(Settings.from_env({"STREAM_SHUTDOWN_GRACE_S": "0"}), longer) == 0.0
    with pytest.raises(ConfigError, match="STREAM_SHUTDOWN_GRACE_S"):
        Settings.from_env({"STREAM_SHUTDOWN_GRACE_S": "-1"})


def test_the_engine_the_worker_builds_drains_for_the_catalog() -> None:
    from stream.worker import Worker

    worker = Worker(Settings.from_env({}), ("primary", "fallback"))
    engine = worker._engine("primary", {})  # type: ignore[arg-type]
    assert engine._config.shutdown_grace_s == 120.0


def test_a_max_request_size_the_fallback_topic_cannot_hold_is_refused() -> None:
    with pytest.raises(ConfigError, match="STREAM_MAX_REQUEST_BYTES"):
        Settings.from_env({"STREAM_MAX_REQUEST_BYTES": "1048588"})
    assert Settings.from_env({"STREAM_MAX_REQUEST_BYTES": "1000000"}).max_request_bytes == 1_000_000


@pytest.mark.parametrize(
    "servers", ["b1:9092", " b1:9092 , b2:9093", "[::1]:9092", "10.0.0.1:1,kafka-2.internal:65535"]
)
def test_bootstrap_servers_that_kafka_takes_are_taken(servers: str) -> None:
    got = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": servers}).kafka.bootstrap_servers
    assert got == ",".join(part.strip() for part in servers.split(","))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('STREAM_GUARANTE = "exactly-once"\n', "did you mean STREAM_GUARANTEE?"),
        ("SOMETHING_ELSE = 1\n", "SOMETHING_ELSE is not a setting;"),
        ("[kafka]\nbootstrap = 'x:1'\n", "kafka must be a string, number or boolean"),
        ("STREAM_TOPIC_PREFIX = 'caf\xe9.'\n", "not UTF-8"),
    ],
)
def test_a_config_file_takes_only_settings(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "stream.toml"
    file.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        Settings.from_env({"STREAM_CONFIG_FILE": str(file)})


@pytest.mark.parametrize("raw", ["١٠", "1_000", "５"])
def test_numbers_are_written_as_kafka_and_the_readme_write_them(raw: str) -> None:
    # Python's int() and float() read other scripts' digits and underscores; an operator
    # reading the value back would not see the number the worker runs with.
    for name in ("STREAM_KAFKA_LINGER_MS", "STREAM_COMMIT_INTERVAL_S"):
        with pytest.raises(ConfigError, match=rf"^{name} must be a (whole )?number \(got "):
            Settings.from_env({name: raw})
    assert Settings.from_env({"STREAM_KAFKA_LINGER_MS": " 10 "}).kafka.linger_ms == 10
    with pytest.raises(ConfigError, match=r"^STREAM_SPEND_MODEL_LIMITS must look like"):
        Settings.from_env(
            {"STREAM_SPEND_LIMIT_USD": "1", "STREAM_SPEND_MODEL_LIMITS": f"glm={raw}"}
        )
