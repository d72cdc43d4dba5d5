"""`--bootstrap-server` and `--command-config`: Java properties and JAAS read as Kafka's
tools read them, mapped onto the settings, and every file stream cannot honour refused in
one line that never repeats a secret. (Against a real SASL broker: tests/test_security.py.)"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from stream.clientconfig import environment, overrides, parse_jaas, parse_properties
from stream.config import Settings
from stream.errors import ConfigError
from tests.kit import run_cli

PASSWORD = 'pa;ss "w\\ord'  # a semicolon, quotes and a backslash: the awkward cases
SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule"
PLAIN = "org.apache.kafka.common.security.plain.PlainLoginModule"


def _jaas(module: str, user: str, password: str) -> str:
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return f"{module} required username={quoted(user)} password={quoted(password)};"


def _store(value: str, *, key: bool = False) -> str:
    """Escape like java.util.Properties.store: what parse_properties must read back."""
    out = []
    for i, char in enumerate(value):
        if char == "\\":
            out.append("\\\\")
        elif char in "\t\n\r\f":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[char])
        elif char in "=:#!" or (char == " " and (key or i == 0)):
            out.append("\\" + char)
        elif not " " <= char <= "~":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def _args(tmp_path: Path, text: str | None, bootstrap: str | None = None) -> argparse.Namespace:
    path = None
    if text is not None:
        path = tmp_path / "client.properties"
        path.write_text(text)
    return argparse.Namespace(
        command_config=str(path) if path else None, bootstrap_server=bootstrap
    )


# -- Java properties -----------------------------------------------------------------------


def test_properties_read_as_java_reads_them() -> None:
    text = (
        "# a comment\n"
        "  ! another\n"
        "\n"
        "a=1\n"
        "b : 2\n"
        "c 3\n"
        "d    =   spaced value  \n"
        "e\\:key\\=x = \\u0041\\tB\n"
        "sasl.jaas.config=org.Module \\\n"
        "    required \\\n"
        '    username="u";\n'
        "empty=\n"
        "last=backslash at end\\"
    )
    parsed = {key: value for _, key, value in parse_properties(text)}
    assert parsed == {
        "a": "1",
        "b": "2",
        "c": "3",
        "d": "spaced value  ",
        "e:key=x": "A\tB",
        "sasl.jaas.config": 'org.Module required username="u";',
        "empty": "",
        "last": "backslash at end",
    }
    lines = {key: line for line, key, _ in parse_properties(text)}
    assert lines["a"] == 4 and lines["sasl.jaas.config"] == 9 and lines["empty"] == 12


_TEXT = st.text(st.characters(blacklist_categories=("Cs",), max_codepoint=0xFFFF), max_size=30)


@given(st.dictionaries(_TEXT.filter(bool), _TEXT, max_size=8))
def test_properties_round_trip_through_javas_escaping(entries: dict[str, str]) -> None:
    text = "\n".join(f"{_store(k, key=True)}={_store(v)}" for k, v in entries.items())
    assert {k: v for _, k, v in parse_properties(text)} == entries


def test_a_malformed_unicode_escape_names_its_line() -> None:
    with pytest.raises(ConfigError, match=r"line 2: malformed \\uXXXX"):
        parse_properties("a=1\nb=\\u12G4\n")


# -- JAAS ----------------------------------------------------------------------------------


@given(_TEXT.filter(bool), _TEXT)
def test_jaas_round_trips_any_username_and_password(user: str, password: str) -> None:
    module, options = parse_jaas(_jaas(SCRAM, user, password))
    assert module == SCRAM and options == {"username": user, "password": password}


def test_jaas_takes_unquoted_values_and_spread_out_layout() -> None:
    module, options = parse_jaas(f"  {PLAIN}\n  required\n username=alice password = s3cret ;  ")
    assert module == PLAIN and options == {"username": "alice", "password": "s3cret"}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (_jaas(PLAIN, "u", PASSWORD)[:-1], "without ';'"),
        (f"{PLAIN} required username=u password={PASSWORD};", "goes on after ';'"),
        (f'{PLAIN} required username="u" password="x', "not closed"),
        (f'{PLAIN} maybe username="u";', "control flag"),
        (f'{PLAIN} required username "u";', "without '='"),
        (f'{PLAIN} required username="u"; {PLAIN} required username="v";', "one login module"),
        ("", "login module"),
    ],
)
def test_a_broken_jaas_line_is_one_error_without_the_secret(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as caught:
        parse_jaas(text, where="client.properties: line 3: sasl.jaas.config")
    message = str(caught.value)
    assert "\n" not in message and PASSWORD not in message and "line 3" in message


# -- properties → settings -----------------------------------------------------------------


def test_a_sasl_ssl_file_becomes_the_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    text = (
        "bootstrap.servers=file-host:9093\n"
        "security.protocol=sasl_ssl\n"
        "sasl.mechanism=SCRAM-SHA-512\n"
        f"sasl.jaas.config={_store(_jaas(SCRAM, 'alice', PASSWORD))}\n"
        "ssl.truststore.type=PEM\n"
        f"ssl.truststore.location={ca}\n"
        "ssl.endpoint.identification.algorithm=https\n"
        "client.id=ops-laptop\n"
    )
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "env-host:9092",
        "STREAM_KAFKA_SASL_USERNAME": "bob",
        "STREAM_KAFKA_SASL_PASSWORD_FILE": "/run/secrets/kafka",  # the file wins over it
        "STREAM_TOPIC_PREFIX": "kept.",
    }
    settings = Settings.from_env(environment(_args(tmp_path, text), env))
    kafka = settings.kafka
    assert kafka.bootstrap_servers == "file-host:9093"
    assert (kafka.security_protocol, kafka.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (kafka.sasl_username, kafka.sasl_password.reveal()) == ("alice", PASSWORD)
    assert kafka.ssl_cafile == str(ca) and kafka.client_id == "ops-laptop"
    assert settings.topic_prefix == "kept."
    assert "ssl_context" in kafka.client_options()
    # and --bootstrap-server wins over both the file and the environment
    cli = Settings.from_env(environment(_args(tmp_path, text, "cli-host:9094"), env))
    assert cli.kafka.bootstrap_servers == "cli-host:9094"


def test_plain_sasl_and_bootstrap_alone(tmp_path: Path) -> None:
    text = (
        "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=PLAIN\n"
        f"sasl.jaas.config={PLAIN} required username=u password=p;\n"
    )
    found = overrides(_args(tmp_path, text))
    assert found == {
        "STREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "STREAM_KAFKA_SASL_MECHANISM": "PLAIN",
        "STREAM_KAFKA_SASL_USERNAME": "u",
        "STREAM_KAFKA_SASL_PASSWORD": "p",
    }
    assert overrides(_args(tmp_path, None, "a:1, b:2")) == {"KAFKA_BOOTSTRAP_SERVERS": "a:1,b:2"}
    ipv6 = overrides(_args(tmp_path, None, "[::1]:9092"))
    assert ipv6 == {"KAFKA_BOOTSTRAP_SERVERS": "[::1]:9092"}
    assert overrides(_args(tmp_path, None)) == {}


def _keystore(folder: Path, password: bytes | None) -> Path:
    """A PEM keystore as Kafka reads it: the PKCS#8 key (encrypted when a password is
    given), then the certificate chain."""
    cert = trustme.CA().issue_cert("client.example")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    keystore = folder / "client.pem"
    keystore.write_bytes(pkcs8 + b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    return keystore


def test_a_byte_order_mark_and_crlf_line_ends_are_read_as_meant(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_bytes(b"\xef\xbb\xbfclient.id=win\r\nsecurity.protocol=SSL\r\n")
    found = overrides(argparse.Namespace(command_config=str(path), bootstrap_server=None))
    assert found == {"STREAM_KAFKA_CLIENT_ID": "win", "STREAM_KAFKA_SECURITY_PROTOCOL": "SSL"}


def test_a_pem_keystore_with_its_key_password_loads(tmp_path: Path) -> None:
    keystore = _keystore(tmp_path, b"key-secret")
    base = f"security.protocol=SSL\nssl.keystore.type=PEM\nssl.keystore.location={keystore}\n"
    right = Settings.from_env(
        environment(_args(tmp_path, base + "ssl.key.password=key-secret"), {})
    )
    assert right.kafka.ssl_certfile == right.kafka.ssl_keyfile == str(keystore)
    assert right.kafka.client_options()["ssl_context"] is not None
    wrong = environment(_args(tmp_path, base + "ssl.key.password=nope"), {})
    with pytest.raises(ConfigError, match="TLS files cannot be loaded") as caught:
        Settings.from_env(wrong)  # at start, not at the first connection
    assert "nope" not in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("acks=all\n", "line 1: the key on this line is not supported"),
        ("sasl.login.class=x\n", "line 1: sasl.login.class is not supported"),
        (f"{PASSWORD.replace(' ', '')}\n", "line 1: the key on this line"),
        ("security.protocol=SASL_SSL\nsasl.mechanism=GSSAPI\n", "line 2: sasl.mechanism GSSAPI"),
        ("security.protocol=TLS\n", "must be one of PLAINTEXT, SSL"),
        (f"sasl.jaas.config={PLAIN} required username=u password=p;\n", "without sasl.mechanism"),
        (
            f"sasl.mechanism=SCRAM-SHA-256\nsasl.jaas.config={PLAIN} required username=u "
            "password=p;\n",
            "needs org.apache.kafka.common.security.scram.ScramLoginModule",
        ),
        (
            f"sasl.mechanism=SCRAM-SHA-256\nsasl.jaas.config={SCRAM} required username=u "
            "password=p tokenauth=true;\n",
            "no other option",
        ),
        (
            f"sasl.mechanism=PLAIN\nsasl.jaas.config={PLAIN} required username=u "
            "password=half other-half=x;\n",
            "no other option",
        ),
        ("ssl.truststore.location=/etc/ca.jks\n", "needs ssl.truststore.type=PEM"),
        ("ssl.truststore.type=JKS\nssl.truststore.location=/x\n", "must be PEM"),
        (
            "ssl.truststore.type=PEM\nssl.truststore.location=/nonexistent/ca.pem\n",
            "not a readable",
        ),
        ("ssl.endpoint.identification.algorithm=\n", "can only be https"),
        ("bootstrap.servers=no-port\n", "HOST:PORT"),
        ("a=\\u00zz\n", "malformed"),
    ],
)
def test_a_file_stream_cannot_honour_is_one_line(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as caught:
        overrides(_args(tmp_path, text + f"ssl.key.password={PASSWORD}\n"))
    message = str(caught.value)
    assert "\n" not in message and PASSWORD not in message
    assert "client.properties" in message


def test_a_missing_file_and_a_bad_bootstrap_server_are_clear(tmp_path: Path) -> None:
    missing = argparse.Namespace(command_config=str(tmp_path / "nope"), bootstrap_server=None)
    with pytest.raises(ConfigError, match="cannot be read: No such file"):
        overrides(missing)
    with pytest.raises(ConfigError, match="--bootstrap-server must be HOST:PORT"):
        overrides(_args(tmp_path, None, "localhost"))


@pytest.mark.parametrize("bad", ["h:0", "h:99999", "h:65536", "a b:9092", "h:9092,", "::1:9092"])
def test_the_command_line_and_the_file_refuse_the_servers_the_environment_refuses(
    tmp_path: Path, bad: str
) -> None:
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS"):
        Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": bad})
    with pytest.raises(ConfigError, match="^--bootstrap-server"):
        overrides(_args(tmp_path, None, bad))
    with pytest.raises(ConfigError, match="line 2: bootstrap.servers") as caught:
        overrides(_args(tmp_path, f"client.id=x\nbootstrap.servers={bad}\n"))
    assert bad not in str(caught.value)  # the file's values stay out of messages


def test_the_file_and_the_environment_offer_the_same_protocols_and_mechanisms(
    tmp_path: Path,
) -> None:
    for protocol in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        found = overrides(_args(tmp_path, f"security.protocol={protocol.lower()}\n"))
        assert found == {"STREAM_KAFKA_SECURITY_PROTOCOL": protocol}
    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        found = overrides(_args(tmp_path, f"sasl.mechanism={mechanism}\n"))
        assert found == {"STREAM_KAFKA_SASL_MECHANISM": mechanism}
    with pytest.raises(ConfigError, match="use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"):
        overrides(_args(tmp_path, "sasl.mechanism=GSSAPI\n"))


@pytest.mark.anyio
async def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    # no broker needed: the file is refused before anything connects
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAM_", "KAFKA_"))}
    bad = tmp_path / "client.properties"
    bad.write_text(f"security.protocol=SASL_SSL\nsasl.jaas.config={PLAIN} required;\n")
    for command in (["topics", "apply"], ["run", "primary"], ["lag"], ["redrive"]):
        done = await run_cli(env, *command, "--command-config", str(bad))
        assert done.returncode == 1, command
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "line 2: sasl.jaas.config" in done.stderr
