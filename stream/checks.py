"""Checks on values people write into settings: each is one `ConfigError` a person can
act on, raised at start, instead of a traceback from deep inside a library later."""

from __future__ import annotations

import math
import re
from pathlib import Path

from stream.errors import ConfigError

__all__ = [
    "COMPRESSIONS",
    "SASL_MECHANISMS",
    "SECURITY_PROTOCOLS",
    "check_bootstrap",
    "check_instance_id",
    "check_topic_prefix",
    "is_topic_name",
    "parse_duration",
    "read_text",
    "tls_context",
]

# What Kafka accepts in a topic name, and so in the prefix of every one of ours.
_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# Kafka's longest topic name.
MAX_TOPIC_NAME = 249
# Each engine appends "-<stage>" (up to 9 characters) to a group.instance.id, and Kafka
# takes 249 characters: this leaves room.
INSTANCE_ID_MAX = 240
# A bootstrap server's host (a name, an IPv4 address, or IPv6 in brackets) and port.
_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[^\s,:\[\]]+")
_PORT = re.compile(r"[0-9]{1,5}")
# What STREAM_KAFKA_SECURITY_PROTOCOL and STREAM_KAFKA_SASL_MECHANISM (or security.protocol
# and sasl.mechanism in --command-config) may say: GSSAPI and OAUTHBEARER are not offered.
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Kafka's codecs: what STREAM_KAFKA_COMPRESSION (or compression.type) may say.
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")
# The longest STREAM_KAFKA_LINGER_MS (or linger.ms) may be: past a second no real rate
# fills a larger batch, and every answer would wait that long to be written.
MAX_LINGER_MS = 1000


def check_bootstrap(value: str, name: str, *, echo: bool = True) -> str:
    """`value` if it is a comma list of host:port (IPv6 hosts in brackets), blanks around
    the commas dropped, else a `ConfigError` naming `name` (aiokafka would fail with a
    traceback). `echo=False` keeps the value out of the message (it came from a file
    that holds passwords)."""
    entries = [entry.strip() for entry in value.split(",")]
    for entry in entries:
        host, _, port = entry.rpartition(":")
        shown = repr(entry) if echo else "an entry"
        if not _HOST.fullmatch(host) or not _PORT.fullmatch(port):
            raise ConfigError(
                f"{name} must be HOST:PORT, or several joined by commas: {shown} is not "
                "host:port (e.g. broker1:9092,broker2:9092; IPv6 in brackets: [::1]:9092)"
            )
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"{name} entry {shown}: the port must be between 1 and 65535")
    return ",".join(entries)


# Seconds per unit of a duration (`90s`, `30m`, `1h30m`, `2d`, `1w`).
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
# A number as Python writes a float (`2`, `1.5`, `.5`, `1e-05`): settings are often
# generated with f"{seconds}s".
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?"
_DURATION_PART = re.compile(rf"({_NUMBER})([smhdw])")
_DURATION = re.compile(rf"{_NUMBER}|(?:{_NUMBER}[smhdw])+")


def parse_duration(text: str) -> float:
    """Seconds in a duration: a number of seconds (`90`, `2.5`) or numbers with units
    s, m, h, d, w (`90s`, `30m`, `1h30m`, `1.5h`, `7d`; any case, no spaces inside);
    a ValueError for anything else. Zero is a duration: each caller keeps its own bounds."""
    value = text.strip().lower()
    if not _DURATION.fullmatch(value):
        raise ValueError(f"{text!r} is not a duration")
    parts = _DURATION_PART.findall(value) or [(value, "s")]
    seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is too long a duration")
    return seconds


def check_instance_id(value: str, name: str) -> str | None:
    """`value` as a group instance id (None when empty); a `ConfigError` naming `name`
    (the variable or option it came from) when Kafka would refuse it (its rules for an
    instance id are those for a topic name)."""
    if not value:
        return None
    if value in (".", "..") or len(value) > INSTANCE_ID_MAX or set(value) - _TOPIC_CHARS:
        raise ConfigError(
            f"{name} {value[:60]!r} is not a valid Kafka group instance id: use "
            f"up to {INSTANCE_ID_MAX} letters, digits, '.', '_' or '-' (not '.' or '..'), "
            "e.g. the pod name of a StatefulSet"
        )
    return value


def is_topic_name(name: str) -> bool:
    """Whether Kafka takes `name` as a topic's (its characters and length)."""
    return 0 < len(name) <= MAX_TOPIC_NAME and name not in (".", "..") and set(name) <= _TOPIC_CHARS


def check_topic_prefix(prefix: str) -> str:
    """STREAM_TOPIC_PREFIX, if Kafka takes it in topic names (their length is checked
    where the declared names are known: `topics.load_specs`)."""
    bad = sorted(set(prefix) - _TOPIC_CHARS)
    if bad:
        raise ConfigError(
            f"STREAM_TOPIC_PREFIX {prefix!r} has {bad[0]!r}: Kafka topic names take only "
            "letters, digits, '.', '_' and '-'"
        )
    if len(prefix) >= MAX_TOPIC_NAME:
        raise ConfigError(f"STREAM_TOPIC_PREFIX is over Kafka's {MAX_TOPIC_NAME}-character limit")
    return prefix


def tls_context(
    cafile: str | None, certfile: str | None, keyfile: str | None, password: str
) -> object:
    """An SSL context from the CA, the client certificate and its key (and the key's
    password), or one `ConfigError` naming what to check (never the password)."""
    from aiokafka.helpers import create_ssl_context

    try:
        return create_ssl_context(
            cafile=cafile, certfile=certfile, keyfile=keyfile, password=password or None
        )
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; missing, not PEM…
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"the TLS files cannot be loaded ({reason}): check that STREAM_KAFKA_SSL_CAFILE "
            "is a PEM CA certificate, STREAM_KAFKA_SSL_CERTFILE/…_KEYFILE a PEM certificate "
            "and its key, and …_KEY_PASSWORD the key's password (or ssl.* in --command-config)"
        ) from exc


def read_text(path: Path, what: str) -> str:
    """A settings, catalog or key file as text, or one `ConfigError` saying why not."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what} cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at {exc.start})"
        ) from None
