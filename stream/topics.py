"""Topics as code: the declarations in topics/, and making a cluster match them.

Each `topics/*.toml` declares one topic (name, partitions, replication factor, configs)
and names the JSON Schema of its values. `apply` creates what is missing, sets declared
configs that differ, and reports the drift it will not fix: it never deletes anything,
never lowers a partition count, and adds partitions only when asked (adding partitions
moves keys to other partitions, which breaks per-key ordering for in-flight work).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import fastjsonschema
import orjson
from aiokafka.admin import NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError as AIOKafkaError

from stream.checks import MAX_TOPIC_NAME, read_text
from stream.config import Settings
from stream.errors import KafkaError, TopicSpecError
from stream.kafka import admin_client, translated
from stream.kafkawire import registered_brokers

__all__ = ["SETTLE_S", "Change", "TopicSpec", "apply", "load_schema", "load_specs", "plan"]

_DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs config_source: set on the topic itself
_TOPIC_ALREADY_EXISTS = 36  # another apply won the race: the topic is there, as wanted
_TOPIC_AUTHORIZATION_FAILED = 29
# INVALID_PARTITIONS, INVALID_CONFIG, POLICY_VIOLATION: Kafka refuses what topics/ declares,
# which trying again will not mend (unlike INVALID_REPLICATION_FACTOR while all are fenced)
_REFUSED = {37, 40, 44}
SETTLE_S = 30.0


@dataclass(frozen=True, kw_only=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]
    schema_file: Path
    source: Path


@dataclass(kw_only=True)
class Change:
    """What `apply` does (or would do) to one topic, and what it leaves for a person."""

    topic: str
    action: Literal["create", "update", "ok", "drift"]
    details: list[str] = field(default_factory=list)
    configs: dict[str, str] = field(default_factory=dict)
    partitions: int = 0
    replication_factor: int = 0
    add_partitions: int = 0

    @property
    def fixable(self) -> bool:
        return self.action != "drift"

    @property
    def changes_something(self) -> bool:
        """`apply` changes the cluster for it (a drifting topic may have configs to set too)."""
        return self.action == "create" or bool(self.configs or self.add_partitions)


def load_specs(directory: Path, *, prefix: str = "") -> list[TopicSpec]:
    """Every topic declared in `directory`, sorted by name; malformed files raise."""
    if not directory.is_dir():
        what = "is a file, not a folder" if directory.exists() else "does not exist"
        raise TopicSpecError(
            f"topics folder {directory} {what}: set STREAM_TOPICS_DIR to the folder of "
            "topic declarations"
        )
    specs = [_load_spec(path, prefix) for path in sorted(directory.glob("*.toml"))]
    if not specs:
        raise TopicSpecError(f"no topic declarations (*.toml) in {directory}")
    longest = max((spec.name for spec in specs), key=len)
    if len(longest) > MAX_TOPIC_NAME:
        raise TopicSpecError(
            f"topic {longest[:40]}… would be {len(longest)} characters, over Kafka's "
            f"{MAX_TOPIC_NAME}: shorten STREAM_TOPIC_PREFIX"
        )
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise TopicSpecError(f"topic {name} is declared twice in {directory}")
    return sorted(specs, key=lambda spec: spec.name)


def _load_spec(path: Path, prefix: str) -> TopicSpec:
    try:
        data = tomllib.loads(read_text(path, str(path)))
    except tomllib.TOMLDecodeError as exc:
        raise TopicSpecError(f"{path}: not valid TOML ({exc})") from exc
    except RecursionError:
        raise TopicSpecError(f"{path}: nested too deep") from None
    unknown = set(data) - {"name", "partitions", "replication_factor", "schema", "configs"}
    if unknown:
        raise TopicSpecError(f"{path}: unknown field {sorted(unknown)[0]!r}")
    name = _field(path, data, "name", str)
    if not name or len(name) > 200 or not all(c.isalnum() or c in "._-" for c in name):
        raise TopicSpecError(f"{path}: field 'name' must use only letters, digits, '.', '_', '-'")
    partitions = _field(path, data, "partitions", int)
    replication = _field(path, data, "replication_factor", int)
    for key, value in (("partitions", partitions), ("replication_factor", replication)):
        if isinstance(value, bool) or value < 1:
            raise TopicSpecError(f"{path}: field {key!r} must be a whole number of at least 1")
    configs = data.get("configs", {})
    if not isinstance(configs, dict) or not all(isinstance(v, str) for v in configs.values()):
        raise TopicSpecError(f"{path}: field 'configs' must be a table of string values")
    isr = configs.get("min.insync.replicas", "1")
    if not (isr.isascii() and isr.isdigit()):  # apply compares it with the replication
        raise TopicSpecError(f"{path}: 'min.insync.replicas' must be a whole number, as a string")
    schema_file = path.parent / _field(path, data, "schema", str)
    if not schema_file.is_file():
        raise TopicSpecError(f"{path}: field 'schema' names {schema_file.name}, which is missing")
    _check_schema(schema_file)
    return TopicSpec(
        name=prefix + name,
        partitions=partitions,
        replication_factor=replication,
        configs=dict(configs),
        schema_file=schema_file,
        source=path,
    )


def _field(path: Path, data: dict[str, Any], key: str, kind: type) -> Any:
    if key not in data:
        raise TopicSpecError(f"{path}: required field {key!r} is missing")
    if not isinstance(data[key], kind) or isinstance(data[key], bool):
        what = {int: "a whole number", str: "a string"}[kind]
        raise TopicSpecError(f"{path}: field {key!r} must be {what}")
    return data[key]


def load_schema(spec: TopicSpec) -> dict[str, Any]:
    """The JSON Schema of the topic's values."""
    return _schema(spec.schema_file)


def _schema(path: Path) -> dict[str, Any]:
    try:
        schema = orjson.loads(read_text(path, str(path)))
    except orjson.JSONDecodeError as exc:
        raise TopicSpecError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(schema, dict):
        raise TopicSpecError(f"{path}: a JSON Schema must be a JSON object")
    return schema


def _check_schema(path: Path) -> None:
    """The workers compile these schemas when they start: one they cannot compile must
    stop `apply`, not every worker later. (fastjsonschema raises what it happens to hit.)"""
    try:
        fastjsonschema.compile(_schema(path))
    except (fastjsonschema.JsonSchemaException, LookupError, TypeError, ValueError) as exc:
        raise TopicSpecError(f"{path}: not a JSON Schema the workers can compile ({exc})") from exc
    except (AttributeError, RecursionError) as exc:
        raise TopicSpecError(f"{path}: not a JSON Schema the workers can compile") from exc


def _effective(
    spec: TopicSpec, brokers: int, replicas: int | None = None
) -> tuple[int, dict[str, str], list[str]]:
    """Replication and configs fitted to a cluster smaller than the declaration, and
    `min.insync.replicas` to the `replicas` an existing topic has (more can never be in
    sync; once its replication drift is mended, the next apply sets the declared value)."""
    replication = min(spec.replication_factor, brokers)
    configs = dict(spec.configs)
    notes = []
    if replication < spec.replication_factor:
        notes.append(
            f"replication {replication} (declared {spec.replication_factor}; "
            f"the cluster has {brokers} broker{'s' if brokers != 1 else ''})"
        )
    isr = configs.get("min.insync.replicas")
    most = replication if replicas is None else max(1, min(replication, replicas))
    if isr is not None and int(isr) > most:
        configs["min.insync.replicas"] = str(most)
    return replication, configs, notes


def _compare(
    spec: TopicSpec,
    brokers: int,
    partitions: int,
    replication: int,
    current: dict[str, str],
    add_partitions: bool,
) -> Change:
    want_replication, want_configs, _ = _effective(spec, brokers, replication)
    change = Change(topic=spec.name, action="ok")
    for key, value in sorted(want_configs.items()):
        if current.get(key) != value:
            change.configs[key] = value
            change.details.append(f"{key} {current.get(key)} → {value}")
    if partitions < spec.partitions and add_partitions:
        change.add_partitions = spec.partitions
        change.details.append(f"partitions {partitions} → {spec.partitions}")
    if change.details:
        change.action = "update"
    drift = []
    if partitions < spec.partitions and not add_partitions:
        drift.append(
            f"{partitions} partitions, declared {spec.partitions} (adding moves keys "
            "between partitions; run with --add-partitions to do it)"
        )
    if partitions > spec.partitions:
        drift.append(
            f"{partitions} partitions, declared {spec.partitions} "
            "(Kafka cannot remove partitions: update the declaration)"
        )
    if replication < want_replication:
        drift.append(
            f"replication {replication}, declared {want_replication} "
            "(reassign partitions with kafka-reassign-partitions)"
        )
    if drift:
        change.action = "drift"
        change.details.extend(drift)
    return change


async def plan(settings: Settings, *, add_partitions: bool = False) -> list[Change]:
    """What `apply` would do to make the cluster match the declarations."""
    specs = load_specs(settings.topics_dir, prefix=settings.topic_prefix)
    async with admin_client(settings.kafka, doing="reading topics") as admin:
        try:
            existing = set(await admin.list_topics())
            brokers = await _cluster_size(admin)
            changes = []
            for spec in specs:
                if spec.name not in existing:
                    changes.append(_creation(spec, brokers))
                    continue
                partitions, replication = await _describe(admin, spec.name)
                current = await _configs(admin, spec.name)
                changes.append(
                    _compare(spec, brokers, partitions, replication, current, add_partitions)
                )
        except AIOKafkaError as exc:
            raise await translated(exc, settings.kafka, "reading topics") from exc
    return changes


async def _cluster_size(admin: Any) -> int:
    """The brokers of the cluster, those down right now included: they still hold replicas,
    and fitting the declarations to the live brokers only would lower replication and
    min.insync.replicas for good while one restarts. Kafka 4.0+ lists the fenced (stopped)
    brokers; before it, the live ones and those that hold a replica of some topic."""
    registered = await registered_brokers(admin)
    if registered is not None:
        return len(registered)
    brokers = {int(b["node_id"]) for b in (await admin.describe_cluster())["brokers"]}
    for description in await admin.describe_topics():  # the one request describe_cluster made
        for partition in description["partitions"]:
            brokers.update(partition["replicas"])
    return len(brokers)


def _creation(spec: TopicSpec, brokers: int) -> Change:
    replication, configs, notes = _effective(spec, brokers)
    details = [f"{spec.partitions} partitions", *notes] + [f"{k}={v}" for k, v in configs.items()]
    return Change(
        topic=spec.name,
        action="create",
        details=details,
        configs=configs,
        partitions=spec.partitions,
        replication_factor=replication,
    )


async def _describe(admin: Any, topic: str) -> tuple[int, int]:
    (description,) = await admin.describe_topics([topic])
    partitions = description["partitions"]
    # On a cluster, a broker may not know a topic just created on another: no partitions yet.
    return len(partitions), min((len(p["replicas"]) for p in partitions), default=0)


async def max_message_bytes(admin: Any, topics: list[str]) -> dict[str, int]:
    """The largest record each topic takes on the cluster (its effective max.message.bytes),
    for those this user may describe; a topic it may not describe is left out."""
    found = {}
    for topic in topics:
        try:
            value = (await _configs(admin, topic)).get("max.message.bytes")
        except AIOKafkaError:
            continue  # no DescribeConfigs ACL: the declared value has to do
        if value is not None and value.isdigit():
            found[topic] = int(value)
    return found


async def _configs(admin: Any, topic: str) -> dict[str, str]:
    """The topic's configs as the cluster sees them (defaults included)."""
    (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    (resource,) = response.resources
    return {entry[0]: entry[1] for entry in resource[4]}


async def _overrides(admin: Any, topic: str) -> dict[str, str]:
    (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    (resource,) = response.resources
    return {entry[0]: entry[1] for entry in resource[4] if entry[3] == _DYNAMIC_TOPIC_CONFIG}


async def apply(settings: Settings, changes: list[Change]) -> list[str]:
    """Carry out the fixable changes of a plan. Returns the topics the brokers did not all
    serve as applied within 30 s (the change is made; some broker's metadata lags)."""
    doing = [change for change in changes if change.changes_something]
    async with admin_client(settings.kafka, doing="applying topics") as admin:
        try:
            for change in doing:
                await _apply_one(admin, change)
            return await _settle(admin, doing)
        except AIOKafkaError as exc:
            raise await translated(exc, settings.kafka, "applying topics") from exc


async def _settle(admin: Any, changes: list[Change], timeout_s: float = SETTLE_S) -> list[str]:
    """Wait until the brokers serve what was applied; the topics they do not yet serve.

    The controller acknowledges a change before every broker's metadata has it, so without
    this wait a `stream run` (or a second plan) right after `apply` may not see it yet.
    """
    waiting = [change.topic for change in changes]
    with anyio.move_on_after(timeout_s):
        for change in changes:
            for _poll in range(int(timeout_s * 10)):  # polling Kafka: nothing to wait on
                if await _serves(admin, change):
                    waiting.remove(change.topic)
                    break
                await anyio.sleep(0.1)
    return waiting


async def _serves(admin: Any, change: Change) -> bool:
    if change.topic not in set(await admin.list_topics()):
        return False
    partitions, _ = await _describe(admin, change.topic)
    configs = await _configs(admin, change.topic)
    wanted = change.add_partitions or change.partitions
    return partitions >= wanted and all(configs.get(k) == v for k, v in change.configs.items())


async def _apply_one(admin: Any, change: Change) -> None:
    if change.action == "create":
        topic = NewTopic(
            change.topic, change.partitions, change.replication_factor, topic_configs=change.configs
        )
        response = await admin.create_topics([topic])
        _raise_for(response.topic_errors, "creating", "CREATE")
        return
    if change.configs:
        # AlterConfigs replaces the topic's whole set of overrides: keep the ones we do
        # not declare, so apply never undoes what someone else set on purpose.
        merged = {**await _overrides(admin, change.topic), **change.configs}
        responses = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, change.topic, configs=merged)]
        )
        # (error_code, error_message, resource_type, resource_name) per resource
        errors = [(r[3], r[0], r[1]) for response in responses for r in response.resources]
        _raise_for(errors, "changing the configs of", "ALTER_CONFIGS")
    if change.add_partitions:
        response = await admin.create_partitions(
            {change.topic: NewPartitions(change.add_partitions)}
        )
        _raise_for(response.topic_errors, "adding partitions to", "ALTER")


def _raise_for(errors: list[Any], doing: str, permission: str) -> None:
    """Kafka's answer per topic, (name, error code, message), as our error when it refused."""
    for error in errors:
        name, code, message = error[0], error[1], error[2] if len(error) > 2 else None
        if not code or code == _TOPIC_ALREADY_EXISTS:
            continue
        if code == _TOPIC_AUTHORIZATION_FAILED:
            raise KafkaError(
                f"{doing} topic {name} was not allowed: grant this user the {permission} "
                "permission on it (kafka-acls), or run `stream topics apply` as an admin"
            )
        reason = f"{doing} topic {name} failed: {message or f'Kafka error {code}'}"
        if code in _REFUSED:  # not retried by --retry-for: the declaration has to change
            raise TopicSpecError(f"{reason}; fix its declaration in topics/")
        raise KafkaError(reason)
