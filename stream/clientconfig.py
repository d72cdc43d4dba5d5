"""Kafka client settings from the command line: `--bootstrap-server` and `--command-config`.

Operators already keep a `client.properties` for Kafka's own tools (`kafka-topics.sh
--bootstrap-server B --command-config client.properties`); every `stream` command that
talks to Kafka takes the same two options. The file's keys become the variables the
settings read, and what the command line gives wins over the environment:

    key (Java properties, as Kafka's tools read them)   variable it sets
    bootstrap.servers                                   KAFKA_BOOTSTRAP_SERVERS
    security.protocol                                   STREAM_KAFKA_SECURITY_PROTOCOL
    sasl.mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) STREAM_KAFKA_SASL_MECHANISM
    sasl.jaas.config (Plain/ScramLoginModule)           STREAM_KAFKA_SASL_USERNAME, …_PASSWORD
    ssl.truststore.location (type PEM)                  STREAM_KAFKA_SSL_CAFILE
    ssl.keystore.location (type PEM: key and chain)     STREAM_KAFKA_SSL_CERTFILE, …_KEYFILE
    ssl.key.password                                    STREAM_KAFKA_SSL_KEY_PASSWORD
    ssl.endpoint.identification.algorithm (https only)  (host names are always checked)
    client.id                                           STREAM_KAFKA_CLIENT_ID
    compression.type (none, gzip, snappy, lz4, zstd)    STREAM_KAFKA_COMPRESSION
    linger.ms (0 to 1000)                               STREAM_KAFKA_LINGER_MS

A key this client cannot honour (a JKS store, GSSAPI, an unknown key) is refused in one
line, never skipped: a dropped `ssl.truststore.location` would come back later as a
baffling TLS failure. No message ever repeats a value from the file (it holds passwords).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

from stream.checks import (
    COMPRESSIONS,
    MAX_LINGER_MS,
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    check_bootstrap,
)
from stream.errors import ConfigError, flag_value

__all__ = [
    "SUPPORTED_KEYS",
    "add_options",
    "environment",
    "overrides",
    "parse_jaas",
    "parse_properties",
]

# The JAAS login module each of SASL_MECHANISMS needs.
_LOGIN_MODULES = {
    mechanism: "org.apache.kafka.common.security.plain.PlainLoginModule"
    if mechanism == "PLAIN"
    else "org.apache.kafka.common.security.scram.ScramLoginModule"
    for mechanism in SASL_MECHANISMS
}
_MECHANISMS_TEXT = f"{', '.join(SASL_MECHANISMS[:-1])} or {SASL_MECHANISMS[-1]}"
_FLAGS = ("required", "requisite", "sufficient", "optional")
SUPPORTED_KEYS = (
    "bootstrap.servers",
    "client.id",
    "compression.type",
    "linger.ms",
    "sasl.jaas.config",
    "sasl.mechanism",
    "security.protocol",
    "ssl.endpoint.identification.algorithm",
    "ssl.key.password",
    "ssl.keystore.location",
    "ssl.keystore.type",
    "ssl.truststore.location",
    "ssl.truststore.type",
)
_MAX_FILE_BYTES = 1024 * 1024
_PROPERTY_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[._-][a-z0-9]+)*\.[a-z0-9._-]+$")


# -- the command line ----------------------------------------------------------------------


def add_options(parser: argparse.ArgumentParser) -> None:
    """`--bootstrap-server` and `--command-config`, as Kafka's own tools spell them."""
    group = parser.add_argument_group("Kafka connection (overrides the environment)")
    group.add_argument(
        "--bootstrap-server",
        metavar="HOST:PORT[,…]",
        help="the cluster to talk to (overrides KAFKA_BOOTSTRAP_SERVERS)",
    )
    group.add_argument(
        "--command-config",
        metavar="FILE",
        help="Kafka client properties, as kafka-topics.sh --command-config reads them: "
        "bootstrap.servers, security.protocol, sasl.mechanism, sasl.jaas.config (PLAIN or "
        "SCRAM), ssl.truststore.location / ssl.keystore.location (type PEM), "
        "ssl.key.password, ssl.endpoint.identification.algorithm (https), client.id, "
        "compression.type, linger.ms; they override the STREAM_KAFKA_* variables",
    )


def environment(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, str]:
    """`env` with what the command line says about Kafka laid over it."""
    found = overrides(args)
    merged = {**env, **found}
    for name in found:
        # a value from the command line replaces a `*_FILE` variant in the environment
        # instead of colliding with it ("set X or X_FILE, not both")
        merged.pop(f"{name}_FILE", None)
    return merged


def overrides(args: argparse.Namespace) -> dict[str, str]:
    """The variables `--command-config` and `--bootstrap-server` set (the latter wins)."""
    found: dict[str, str] = {}
    path = getattr(args, "command_config", None)
    if path:
        found.update(_from_file(Path(path)))
    bootstrap = getattr(args, "bootstrap_server", None)
    if bootstrap is not None:
        found["KAFKA_BOOTSTRAP_SERVERS"] = flag_value(
            check_bootstrap, bootstrap, "--bootstrap-server"
        )
    return found


# -- the properties file -------------------------------------------------------------------


def _from_file(path: Path) -> dict[str, str]:
    where = f"--command-config {path}"
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_FILE_BYTES + 1)  # not all of /dev/zero, given by mistake
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}") from exc
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError(f"{where} is over {_MAX_FILE_BYTES // 1024} KiB: not a properties file")
    text = data.decode("latin-1")  # what java.util.Properties.load reads
    # an editor's UTF-8 byte order mark would become part of the first key
    text = text.removeprefix("\xef\xbb\xbf")
    entries = parse_properties(text, where=where)
    properties = {key: value for _, key, value in entries}
    lines = {key: line for line, key, _ in entries}
    for key in properties:
        if key not in SUPPORTED_KEYS:
            # named only when it looks like a property: a stray line could be a password
            name = key if _PROPERTY_NAME.match(key) else "the key on this line"
            raise ConfigError(
                f"{where}: line {lines[key]}: {name} is not supported by stream (it takes "
                f"{', '.join(SUPPORTED_KEYS)}); remove it"
            )
    return _Mapper(properties, lines, where).variables()


class _Mapper:
    """Supported Kafka client properties → the settings' variables, checked key by key."""

    def __init__(self, props: dict[str, str], lines: dict[str, int], where: str) -> None:
        self.props = props
        self.lines = lines
        self.where = where
        self.found: dict[str, str] = {}

    def _compression(self) -> str:
        value = self.props["compression.type"].strip().lower()
        if value not in COMPRESSIONS:
            raise self.fail("compression.type", f"must be one of {', '.join(COMPRESSIONS)}")
        return value

    def _linger(self) -> str:
        value = self.props["linger.ms"].strip()
        if not value.isascii() or not value.isdigit() or int(value) > MAX_LINGER_MS:
            raise self.fail("linger.ms", f"must be a whole number of ms from 0 to {MAX_LINGER_MS}")
        return str(int(value))

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: line {self.lines[key]}: {key} {why}")

    def variables(self) -> dict[str, str]:
        if "bootstrap.servers" in self.props:
            where = f"{self.where}: line {self.lines['bootstrap.servers']}: bootstrap.servers"
            self.found["KAFKA_BOOTSTRAP_SERVERS"] = check_bootstrap(
                self.props["bootstrap.servers"], where, echo=False
            )
        if "client.id" in self.props:
            self.found["STREAM_KAFKA_CLIENT_ID"] = self.props["client.id"].strip()
        if "compression.type" in self.props:
            self.found["STREAM_KAFKA_COMPRESSION"] = self._compression()
        if "linger.ms" in self.props:
            self.found["STREAM_KAFKA_LINGER_MS"] = self._linger()
        self._protocol()
        self._sasl()
        self._tls()
        return self.found

    def _protocol(self) -> None:
        protocol = self.props.get("security.protocol", "").strip().upper()
        if "security.protocol" in self.props:
            if protocol not in SECURITY_PROTOCOLS:
                raise self.fail(
                    "security.protocol", f"must be one of {', '.join(SECURITY_PROTOCOLS)}"
                )
            self.found["STREAM_KAFKA_SECURITY_PROTOCOL"] = protocol

    def _sasl(self) -> None:
        mechanism = self.props.get("sasl.mechanism", "").strip().upper()
        if "sasl.mechanism" in self.props:
            if mechanism not in _LOGIN_MODULES:
                raise self.fail(
                    "sasl.mechanism",
                    f"{mechanism or '(empty)'} is not supported: use {_MECHANISMS_TEXT}",
                )
            self.found["STREAM_KAFKA_SASL_MECHANISM"] = mechanism
        if "sasl.jaas.config" not in self.props:
            return
        if not mechanism:
            raise self.fail(
                "sasl.jaas.config",
                "is set without sasl.mechanism (Kafka would then use GSSAPI, which stream "
                f"does not support): add sasl.mechanism={_MECHANISMS_TEXT}",
            )
        where = f"{self.where}: line {self.lines['sasl.jaas.config']}: sasl.jaas.config"
        module, options = parse_jaas(self.props["sasl.jaas.config"], where=where)
        if module != _LOGIN_MODULES[mechanism]:
            raise self.fail(
                "sasl.jaas.config",
                f"names {module}, but sasl.mechanism={mechanism} needs {_LOGIN_MODULES[mechanism]}",
            )
        if set(options) != {"username", "password"} or not options["username"]:
            # which options it does hold stays unsaid: a password split at a blank would
            # show up among them
            raise self.fail(
                "sasl.jaas.config",
                'must hold username="…" and password="…" and no other option (quote values '
                "that hold blanks, quotes or ';')",
            )
        self.found["STREAM_KAFKA_SASL_USERNAME"] = options["username"]
        self.found["STREAM_KAFKA_SASL_PASSWORD"] = options["password"]

    def _tls(self) -> None:
        for store in ("truststore", "keystore"):
            kind = f"ssl.{store}.type"
            if kind in self.props and self.props[kind].strip().upper() != "PEM":
                raise self.fail(
                    kind,
                    "must be PEM: stream reads PEM files only (convert a JKS or PKCS12 store "
                    "with keytool and openssl, then set it to PEM)",
                )
        if "ssl.truststore.location" in self.props:
            self._pem("truststore")
            self.found["STREAM_KAFKA_SSL_CAFILE"] = self._file("ssl.truststore.location")
        if "ssl.keystore.location" in self.props:
            self._pem("keystore")
            keystore = self._file("ssl.keystore.location")
            # a PEM keystore holds the private key and the certificate chain in one file
            self.found["STREAM_KAFKA_SSL_CERTFILE"] = keystore
            self.found["STREAM_KAFKA_SSL_KEYFILE"] = keystore
        if "ssl.key.password" in self.props:
            self.found["STREAM_KAFKA_SSL_KEY_PASSWORD"] = self.props["ssl.key.password"]
        algorithm = self.props.get("ssl.endpoint.identification.algorithm")
        if algorithm is not None and algorithm.strip().lower() != "https":
            raise self.fail(
                "ssl.endpoint.identification.algorithm",
                "can only be https: stream always checks the broker's host name against its "
                "certificate",
            )

    def _pem(self, store: str) -> None:
        if f"ssl.{store}.type" not in self.props:
            raise self.fail(
                f"ssl.{store}.location",
                f"needs ssl.{store}.type=PEM (Kafka's default, JKS, is not readable here)",
            )

    def _file(self, key: str) -> str:
        # relative to the working directory, as Kafka's tools read it
        path = Path(self.props[key].strip())
        if not path.is_file():
            raise self.fail(key, f"names {path}, which is not a readable file")
        return str(path)


def parse_properties(text: str, *, where: str = "properties") -> list[tuple[int, str, str]]:
    """(line number, key, value) of each entry, read the way `java.util.Properties.load`
    reads them: `#`/`!` comments, `=`, `:` or blanks between key and value, a trailing
    backslash continuing the line, and `\\t \\n \\uXXXX`-style escapes."""
    lines = re.split(r"\r\n|\r|\n", text)
    entries = []
    index = 0
    while index < len(lines):
        number = index + 1
        line = lines[index].lstrip(" \t\f")
        index += 1
        if not line or line[0] in "#!":
            continue
        while _continues(line):
            line = line[:-1]
            if index == len(lines):
                break
            line += lines[index].lstrip(" \t\f")
            index += 1
        key, value = _split(line)
        entries.append((number, _unescape(key, where, number), _unescape(value, where, number)))
    return entries


def _continues(line: str) -> bool:
    """An odd number of backslashes at the end: the last one joins the next line."""
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def _split(line: str) -> tuple[str, str]:
    """The raw (still escaped) key and value of one logical line."""
    at, escaped = 0, False
    while at < len(line):
        char = line[at]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "=: \t\f":
            break
        at += 1
    key, rest = line[:at], line[at:]
    rest = rest.lstrip(" \t\f")
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(" \t\f")
    return key, rest


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(raw: str, where: str, number: int) -> str:
    out: list[str] = []
    at = 0
    while at < len(raw):
        char = raw[at]
        at += 1
        if char != "\\" or at == len(raw):
            out.append("" if char == "\\" else char)
            continue
        code = raw[at]
        at += 1
        if code == "u":
            digits = raw[at : at + 4]
            if len(digits) < 4 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ConfigError(f"{where}: line {number}: malformed \\uXXXX escape")
            out.append(chr(int(digits, 16)))
            at += 4
        else:
            out.append(_ESCAPES.get(code, code))
    return "".join(out)


# -- JAAS ----------------------------------------------------------------------------------


def parse_jaas(text: str, *, where: str = "sasl.jaas.config") -> tuple[str, dict[str, str]]:
    """(login module class, options) of a one-module JAAS line, as Kafka clients take it:
    `org.apache.kafka.common.security.plain.PlainLoginModule required username="u"
    password="p";`. Errors never quote the text: it holds a password."""
    scanner = _Jaas(text, where)
    module = scanner.word("a login module class")
    flag = scanner.word("a control flag")
    if flag not in _FLAGS:
        raise scanner.error(f"the control flag must be one of {', '.join(_FLAGS)}")
    options: dict[str, str] = {}
    while not scanner.take(";"):
        key = scanner.word("an option name or ';'")
        if not scanner.take("="):
            # never the option's name: a badly quoted password falls apart into "names"
            raise scanner.error(
                "an option without '=' and a value (quote values that hold blanks, quotes or ';')"
            )
        options[key] = scanner.value()
    if not scanner.at_end():
        raise scanner.error(
            "goes on after ';': Kafka clients take one login module (quote a value that holds ';')"
        )
    return module, options


class _Jaas:
    _STOP = frozenset(' \t\r\n\f=;"')

    def __init__(self, text: str, where: str) -> None:
        self.text, self.where, self.at = text, where, 0

    def error(self, why: str) -> ConfigError:
        return ConfigError(
            f'{self.where}: {why} (expected: LoginModule required username="…" password="…";)'
        )

    def _skip(self) -> None:
        while self.at < len(self.text) and self.text[self.at].isspace():
            self.at += 1

    def at_end(self) -> bool:
        self._skip()
        return self.at == len(self.text)

    def take(self, char: str) -> bool:
        self._skip()
        if self.at == len(self.text):
            raise self.error("ends without ';'")
        if self.text[self.at] == char:
            self.at += 1
            return True
        return False

    def word(self, what: str) -> str:
        self._skip()
        start = self.at
        while self.at < len(self.text) and self.text[self.at] not in self._STOP:
            self.at += 1
        if self.at == start:
            raise self.error(f"expected {what}")
        return self.text[start : self.at]

    def value(self) -> str:
        self._skip()
        if self.at < len(self.text) and self.text[self.at] == '"':
            return self._quoted()
        return self.word("a value")

    def _quoted(self) -> str:
        self.at += 1  # the opening quote
        out: list[str] = []
        while self.at < len(self.text):
            char = self.text[self.at]
            self.at += 1
            if char == '"':
                return "".join(out)
            if char == "\\" and self.at < len(self.text):
                char = self.text[self.at]
                self.at += 1
            out.append(char)
        raise self.error("a quoted value is not closed")
