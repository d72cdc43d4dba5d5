"""Settings, read once at start from the environment (and an optional TOML file).

Names people look for keep their usual spelling (`KAFKA_BOOTSTRAP_SERVERS`,
`SYNTHETIC_API_KEY`, `TOGETHER_BASE_URL` …); everything else is prefixed `STREAM_`.
A secret may also come from a file named by `<NAME>_FILE` (Docker and Kubernetes secrets).
Every check lives in `Settings.from_env`, and every failure is one `ConfigError` whose
message names the variable and says what a valid value looks like.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stream.checks import (
    COMPRESSIONS,
    MAX_LINGER_MS,
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    check_bootstrap,
    check_instance_id,
    check_topic_prefix,
    parse_duration,
    tls_context,
)
from stream.errors import ConfigError
from stream.source import Secret, Source

__all__ = [
    "CLOSE_RESERVE_S",
    "EngineSettings",
    "KafkaSettings",
    "ProviderSettings",
    "Secret",
    "Settings",
    "SpendSettings",
    "check_instance_id",  # from checks; worker.py takes it from here
    "seconds_option",
]

Guarantee = Literal["at-least-once", "exactly-once"]
Ordering = Literal["unordered", "key"]

SYNTHETIC_BASE_URL = "https://api.synthetic.new/openai/v1"
TOGETHER_BASE_URL = "https://api.together.xyz/v1"
# The fallback topic takes 1,048,588-byte records; its records are a request plus a failure
# of at most a few KiB. Bigger requests are dead letters (`too_large`), bytes and all.
MAX_REQUEST_BYTES = 1_048_588 - 16 * 1024
# Seconds kept, at the end of a rebalance or a shutdown, for closing producers and leaving.
CLOSE_RESERVE_S = 10.0
# Kafka's protocol carries its timeouts as 32-bit integers: above this, its requests fail.
KAFKA_MAX_INT = 2**31 - 1
# Bounds for durations: past them a value is a typo (1e23), not a choice.
_HOUR_S = 3600.0
_DAY_S = 86400.0
_MAX_SPEND_WINDOW_S = 31 * _DAY_S


@dataclass(frozen=True, kw_only=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret = field(default_factory=lambda: Secret(""))
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: Secret = field(default_factory=lambda: Secret(""))
    client_id: str = "prediction-stream"
    request_timeout_ms: int = 30_000
    compression: str = "none"  # of every batch this process writes (one of COMPRESSIONS)
    # How long the worker's output producers hold a batch open for more records: larger
    # batches are fewer produce requests, each a Python round of aiokafka's sender.
    linger_ms: int = 25
    # The most a compressed batch read from Kafka inflates to (`stream.inflate`): past it,
    # its records are dead letters, not the worker's memory.
    max_batch_mb: int = 16
    cluster_name: str | None = None  # the lag metrics' `cluster_name`; default: the cluster id

    @property
    def max_batch_bytes(self) -> int:
        return self.max_batch_mb * 1024 * 1024

    def client_options(self) -> dict[str, object]:
        """Keyword arguments shared by every aiokafka client this process makes."""
        options: dict[str, object] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password.reveal()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self._ssl_context()
        return options

    def producer_options(self) -> dict[str, object]:
        """`client_options` and what every producer this process makes shares."""
        codec = None if self.compression == "none" else self.compression
        return {**self.client_options(), "compression_type": codec}

    def _ssl_context(self) -> object:
        return tls_context(
            self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile, self.ssl_key_password.reveal()
        )


@dataclass(frozen=True, kw_only=True)
class ProviderSettings:
    name: str
    base_url: str
    api_key: Secret
    timeout_s: float = 120.0
    connect_timeout_s: float = 10.0
    max_connections: int = 1000
    max_retries: int = 4
    breaker_cooldown_s: float = 15.0
    # Calls in flight per model when the worker starts; grows by AIMD to max_connections.
    initial_concurrency: int = 16


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    guarantee: Guarantee = "at-least-once"
    max_in_flight: int = 1000
    max_in_flight_per_partition: int = 500
    ordering: Ordering = "unordered"
    commit_interval_s: float = 1.0
    # How long SIGTERM lets running calls finish. None: as long as the catalog's longest
    # model timeout (no call can run longer); the worker works it out (`drain_grace_s`).
    shutdown_grace_s: float | None = None
    # LLM calls take minutes: a consumer must not be kicked out of its group for that.
    max_poll_interval_ms: int = 600_000
    rebalance_timeout_ms: int = 120_000
    session_timeout_ms: int = 45_000
    # How often the consumer reads the cluster's metadata again: partitions added to a
    # topic (`topics apply --add-partitions`) are consumed within this and a rebalance.
    metadata_max_age_ms: int = 30_000
    # Static membership (Kafka's group.instance.id): a restart with the same id keeps the
    # partitions without a rebalance. None: dynamic membership.
    instance_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class SpendSettings:
    """The spend limit (USD over a sliding window); None: no limit."""

    limit_usd: float | None = None
    window_s: float = 3600.0
    model_limits: Mapping[str, float] = field(default_factory=dict)
    # Replays (the backfill topic) and re-drives spend from their own limit when it is set.
    backfill_limit_usd: float | None = None
    # Where the window is kept across restarts (`stream.spendstate`).
    state_dir: Path = field(default_factory=lambda: _state_dir(os.environ))


@dataclass(frozen=True, kw_only=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    synthetic: ProviderSettings = field(
        default_factory=lambda: ProviderSettings(
            name="synthetic", base_url=SYNTHETIC_BASE_URL, api_key=Secret("")
        )
    )
    together: ProviderSettings = field(
        default_factory=lambda: ProviderSettings(
            name="together", base_url=TOGETHER_BASE_URL, api_key=Secret("")
        )
    )
    engine: EngineSettings = field(default_factory=EngineSettings)
    topic_prefix: str = ""
    topics_dir: Path = field(default_factory=lambda: default_topics_dir())
    catalog_file: Path | None = None
    metrics_port: int = 9400
    metrics_host: str = "0.0.0.0"
    log_level: str = "INFO"
    log_content: bool = False
    max_request_bytes: int = 256 * 1024
    spend: SpendSettings = field(default_factory=SpendSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from `env` (default: the process environment) and validate them."""
        return cls._from_source(Source(dict(os.environ if env is None else env)))

    @classmethod
    def variables(cls) -> frozenset[str]:
        """Every environment variable the settings read (for docs and deployment checks)."""
        source = Source({})
        cls._from_source(source)
        return frozenset(source.asked)

    @classmethod
    def _from_source(cls, source: Source) -> Settings:
        max_in_flight = source.integer("STREAM_MAX_IN_FLIGHT", 1000, low=1)
        rebalance_timeout_ms = source.integer(
            "STREAM_REBALANCE_TIMEOUT_MS", 120_000, low=1, high=KAFKA_MAX_INT
        )
        engine = EngineSettings(
            guarantee=source.choice(
                "STREAM_GUARANTEE", ("at-least-once", "exactly-once"), "at-least-once"
            ),  # type: ignore[arg-type]
            max_in_flight=max_in_flight,
            # unset, it follows the total down: setting only the total must just work
            max_in_flight_per_partition=source.integer(
                "STREAM_MAX_IN_FLIGHT_PER_PARTITION", min(500, max_in_flight), low=1
            ),
            ordering=source.choice("STREAM_ORDERING", ("unordered", "key"), "unordered"),  # type: ignore[arg-type]
            commit_interval_s=source.number(
                "STREAM_COMMIT_INTERVAL_S", 1.0, low=0.01, high=_HOUR_S
            ),
            shutdown_grace_s=source.optional_number(
                "STREAM_SHUTDOWN_GRACE_S", low=0.0, high=_DAY_S
            ),
            max_poll_interval_ms=source.integer(
                "STREAM_MAX_POLL_INTERVAL_MS", 600_000, low=1, high=KAFKA_MAX_INT
            ),
            rebalance_timeout_ms=rebalance_timeout_ms,
            session_timeout_ms=source.integer(
                "STREAM_SESSION_TIMEOUT_MS", 45_000, low=1, high=KAFKA_MAX_INT
            ),
            instance_id=_instance_id(source),
        )
        settings = cls(
            kafka=_kafka_settings(source),
            synthetic=_provider_settings(source, "synthetic", SYNTHETIC_BASE_URL),
            together=_provider_settings(source, "together", TOGETHER_BASE_URL),
            engine=engine,
            topic_prefix=check_topic_prefix(source.text("STREAM_TOPIC_PREFIX", "")),
            topics_dir=Path(source.text("STREAM_TOPICS_DIR", str(default_topics_dir()))),
            catalog_file=source.path("STREAM_CATALOG_FILE"),
            metrics_port=source.integer("STREAM_METRICS_PORT", 9400, low=0, high=65535),
            metrics_host=source.text("STREAM_METRICS_HOST", "0.0.0.0"),
            log_level=source.choice(
                "STREAM_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", upper=True
            ),
            log_content=source.boolean("STREAM_LOG_CONTENT", False),
            max_request_bytes=source.integer("STREAM_MAX_REQUEST_BYTES", 256 * 1024, low=1024),
            spend=_spend_settings(source),
        )
        source.check_file_keys()
        source.check_env_keys()
        settings.check()
        return settings

    def check(self) -> None:
        """Cross-field checks: one place, one `ConfigError` with an actionable sentence."""
        if self.max_request_bytes > MAX_REQUEST_BYTES:
            raise ConfigError(
                f"STREAM_MAX_REQUEST_BYTES ({self.max_request_bytes}) is over "
                f"{MAX_REQUEST_BYTES}: a request that big would not fit in the fallback "
                "topic (1 MiB) with its failure attached"
            )
        engine = self.engine
        if engine.max_in_flight_per_partition > engine.max_in_flight:
            raise ConfigError(
                "STREAM_MAX_IN_FLIGHT_PER_PARTITION "
                f"({engine.max_in_flight_per_partition}) exceeds STREAM_MAX_IN_FLIGHT "
                f"({engine.max_in_flight}); lower it or raise STREAM_MAX_IN_FLIGHT"
            )
        if engine.session_timeout_ms >= engine.rebalance_timeout_ms:
            raise ConfigError("STREAM_SESSION_TIMEOUT_MS must be below STREAM_REBALANCE_TIMEOUT_MS")
        if CLOSE_RESERVE_S * 1000 >= engine.rebalance_timeout_ms:
            raise ConfigError(
                f"STREAM_REBALANCE_TIMEOUT_MS ({engine.rebalance_timeout_ms} ms) must be over "
                f"{CLOSE_RESERVE_S:g} s: a revoke commits and closes within it"
            )
        kafka = self.kafka
        if kafka.security_protocol.startswith("SASL_") and not (
            kafka.sasl_mechanism and kafka.sasl_username and kafka.sasl_password
        ):
            raise ConfigError(
                f"STREAM_KAFKA_SECURITY_PROTOCOL={kafka.security_protocol} needs "
                "STREAM_KAFKA_SASL_MECHANISM, STREAM_KAFKA_SASL_USERNAME and "
                "STREAM_KAFKA_SASL_PASSWORD (or STREAM_KAFKA_SASL_PASSWORD_FILE; in a "
                "--command-config file: sasl.mechanism and sasl.jaas.config)"
            )
        if kafka.security_protocol in ("SSL", "SASL_SSL"):
            kafka.client_options()  # loads the TLS files now, as every client will

    def topic(self, name: str) -> str:
        """The real topic name for a declared one (`predictions.requests` → prefixed)."""
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        """The real consumer group name for a declared one."""
        return f"{self.topic_prefix}{name}"


def default_topics_dir() -> Path:
    """The declarations shipped with the package: in a checkout `stream/data/topics` is a
    link to `topics/`, and wheels and sdists carry a copy of it."""
    return Path(__file__).resolve().parent / "data" / "topics"


def _kafka_settings(source: Source) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=check_bootstrap(
            source.text("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"), "KAFKA_BOOTSTRAP_SERVERS"
        ),
        security_protocol=source.choice(
            "STREAM_KAFKA_SECURITY_PROTOCOL", SECURITY_PROTOCOLS, "PLAINTEXT", upper=True
        ),
        sasl_mechanism=source.optional_choice("STREAM_KAFKA_SASL_MECHANISM", SASL_MECHANISMS),
        sasl_username=source.text("STREAM_KAFKA_SASL_USERNAME", "") or None,
        sasl_password=source.secret("STREAM_KAFKA_SASL_PASSWORD"),
        ssl_cafile=source.file_name("STREAM_KAFKA_SSL_CAFILE"),
        ssl_certfile=source.file_name("STREAM_KAFKA_SSL_CERTFILE"),
        ssl_keyfile=source.file_name("STREAM_KAFKA_SSL_KEYFILE"),
        ssl_key_password=source.secret("STREAM_KAFKA_SSL_KEY_PASSWORD"),
        client_id=source.text("STREAM_KAFKA_CLIENT_ID", "prediction-stream"),
        compression=source.choice("STREAM_KAFKA_COMPRESSION", COMPRESSIONS, "none", lower=True),
        linger_ms=source.integer("STREAM_KAFKA_LINGER_MS", 25, low=0, high=MAX_LINGER_MS),
        max_batch_mb=source.integer("STREAM_KAFKA_MAX_BATCH_MB", 16, low=1, high=1024),
        cluster_name=source.text("STREAM_KAFKA_CLUSTER_NAME", "") or None,
    )


def _instance_id(source: Source) -> str | None:
    return check_instance_id(source.text("STREAM_INSTANCE_ID", ""), "STREAM_INSTANCE_ID")


def _provider_settings(source: Source, name: str, base_url: str) -> ProviderSettings:
    upper = name.upper()
    url = source.text(f"{upper}_BASE_URL", base_url).rstrip("/")
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    if scheme not in ("http", "https") or not host or any(c.isspace() for c in url):
        raise ConfigError(
            f"{upper}_BASE_URL must be an http:// or https:// URL with a host, such as "
            f"{base_url} (got {url!r})"
        )
    return ProviderSettings(
        name=name,
        base_url=url,
        api_key=source.secret(f"{upper}_API_KEY"),
        timeout_s=source.number(f"STREAM_{upper}_TIMEOUT_S", 120.0, low=0.1, high=_DAY_S),
        connect_timeout_s=source.number(
            f"STREAM_{upper}_CONNECT_TIMEOUT_S", 10.0, low=0.1, high=_HOUR_S
        ),
        max_connections=source.integer(f"STREAM_{upper}_MAX_CONNECTIONS", 1000, low=1),
        max_retries=source.integer(f"STREAM_{upper}_MAX_RETRIES", 4, low=0, high=20),
        breaker_cooldown_s=source.number(
            f"STREAM_{upper}_BREAKER_COOLDOWN_S", 15.0, low=0.1, high=_DAY_S
        ),
        initial_concurrency=source.integer(f"STREAM_{upper}_INITIAL_CONCURRENCY", 16, low=1),
    )


def _spend_settings(source: Source) -> SpendSettings:
    window = source.text("STREAM_SPEND_WINDOW", "1h")
    try:
        window_s = parse_window(window)
    except ValueError:
        raise ConfigError(
            f"STREAM_SPEND_WINDOW must be a duration such as 90s, 30m, 1h or 24h (got {window!r})"
        ) from None
    if window_s > _MAX_SPEND_WINDOW_S:
        raise ConfigError(f"STREAM_SPEND_WINDOW must be at most 31d (got {window!r})")
    return SpendSettings(
        limit_usd=source.optional_number("STREAM_SPEND_LIMIT_USD", above=True),
        window_s=window_s,
        model_limits=source.amounts("STREAM_SPEND_MODEL_LIMITS"),
        backfill_limit_usd=source.optional_number("STREAM_BACKFILL_SPEND_LIMIT_USD", above=True),
        state_dir=_state_dir(source.env, source.text("STREAM_STATE_DIR", "")),
    )


def _state_dir(env: Mapping[str, str], chosen: str = "") -> Path:
    """STREAM_STATE_DIR, else `$XDG_STATE_HOME/prediction-stream`, else
    `~/.local/state/prediction-stream`."""
    if chosen:
        return Path(chosen).expanduser()
    base = env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "prediction-stream"


def parse_window(text: str) -> float:
    """`90`, `90s`, `30m`, `1h`, `1h30m`, `24h`, `7d` → seconds (more than zero); ValueError
    for anything else."""
    seconds = parse_duration(text)
    if not seconds > 0:
        raise ValueError(text)
    return seconds


def seconds_option(text: str) -> float:
    """argparse's `type` for an option in seconds: a number as before (`90`, `0.5`; `inf`
    and `nan` too, for the command's own bounds to refuse in one line), or a duration with
    units as the environment takes them (`90s`, `5m`, `1h30m`)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use seconds (90) or units such as 90s, 5m, 1h"
        ) from None
