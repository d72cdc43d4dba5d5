"""The house keeps its shape: each wing imports only what lies below it, no import goes in
a circle, and no module grows past what one reader can hold (DESIGN.md, "The house").

Imports are read from the source (every `import` and `from … import`, also those inside
functions), not from what happens to be loaded."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "stream"
MAX_LINES = 450

# What each part of the package may import (besides itself and the standard library). A
# part is a top-level module or a folder; `cli` finds its commands by name at run time.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "compact": set(),
    "logs": set(),
    "interrupts": set(),
    # release: a record's leave to give a call that has not gone out back (engine → client)
    "release": set(),
    "checks": {"errors"},
    "clientconfig": {"checks", "errors"},
    "source": {"checks", "errors"},
    "config": {"checks", "errors", "source"},
    # kafkawire: Kafka requests of our own, where aiokafka lacks one or misreads it
    "kafkawire": set(),
    # inflate: compressed batches read from Kafka inflate within a bound
    "inflate": set(),
    # kafkaerrors: what a Kafka failure means to a person (translation, probes)
    "kafkaerrors": {"config", "errors"},
    "kafka": {"config", "errors", "inflate", "kafkaerrors", "kafkawire"},
    "prices": set(),
    "catalog": {"checks", "config", "errors", "prices"},
    "headers": set(),
    # requestshape: the usual request recognised before the compiled schema is asked
    "requestshape": set(),
    "records": {"compact", "errors", "headers", "requestshape"},
    "topics": {"checks", "config", "errors", "kafka", "kafkawire"},
    "topicscli": {"config", "errors", "topics"},
    "engine": {"config", "errors", "inflate", "kafka", "kafkawire", "release"},
    "providers": {"catalog", "compact", "config", "errors", "prices", "release"},
    "spend": {"catalog", "config", "errors", "prices", "providers"},
    "spendstate": {"catalog", "config", "errors", "prices", "providers", "spend"},
    "observe": {
        "config",
        "engine",
        "errors",
        "inflate",
        "interrupts",
        "kafka",
        "kafkawire",
        "prices",
        "providers",
    },
    # engine: its fetch seam steps over records the Kafka client cannot decode
    "backfill": {
        "checks",
        "config",
        "engine",
        "errors",
        "interrupts",
        "kafka",
        "records",
        "topics",
    },
    # outlimits: the largest record each output topic takes, and what an output weighs
    "outlimits": {"config", "engine", "topics"},
    "stages": {
        "catalog",
        "config",
        "engine",
        "errors",
        "outlimits",
        "prices",
        "providers",
        "records",
        "spend",
        "topics",
    },
    "worker": {
        "catalog",
        "config",
        "engine",
        "errors",
        "kafka",
        "logs",
        "observe",
        "prices",
        "providers",
        "spend",
        "spendstate",
        "stages",
        "topics",
    },
    "devtools": {
        "backfill",
        "clientconfig",
        "catalog",
        "config",
        "engine",
        "errors",
        "kafka",
        "logs",
        "observe",
        "prices",
        "providers",
        "records",
        "spend",
        "spendstate",
        "stages",
        "topics",
        "worker",
    },
    "cli": {"clientconfig", "config", "errors", "logs", "__init__"},
    "__main__": {"cli"},
    "__init__": {"config", "errors"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """The package's modules that `path` imports."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stream"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                yield name if name in modules else node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("stream"))


def _part(module: str) -> str:
    """`stream.engine.flow` → `engine`; `stream` → `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_imports_only_what_lies_below_it() -> None:
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        part = _part(module)
        assert part in ALLOWED, f"{module}: a new part of the house; place it in ALLOWED"
        for target in set(_imports(path, modules)):
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_goes_in_a_circle() -> None:
    modules = _modules()
    graph = {m: set(_imports(p, modules)) - {m} for m, p in modules.items()}
    # `stream/__init__.py` runs before any `stream.x`: an edge to it is not a dependency
    # of the importer's design, only Python's package mechanics.
    graph = {m: {t for t in targets if t != "stream"} for m, targets in graph.items()}
    cycles = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" → ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_module_is_longer_than_a_reader_can_hold(module: str) -> None:
    lines = len(_modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines: split it along a seam"


def _imported_from_tests(path: Path) -> Iterator[str]:
    """Every module under `tests` that `path` imports, relative imports made absolute."""
    package = ".".join(path.relative_to(TESTS.parent).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)


def test_no_module_under_tests_imports_a_test_module_or_the_conftest() -> None:
    """What tests share lives in tests/kit/: importing a test module runs its module-level
    code again and ties one test file's helpers to another's."""
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        for module in set(_imported_from_tests(path)):
            last = module.rpartition(".")[2]
            if module.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                wrong.append(f"{path.relative_to(TESTS.parent)} imports {module}")
    assert sorted(wrong) == []


def test_each_command_is_registered_by_the_module_the_cli_names_for_it() -> None:
    from stream.cli import COMMANDS, build_parser

    for name in COMMANDS:
        parser = build_parser([name, "--help"])
        (commands,) = [a for a in parser._actions if a.dest == "command"]
        assert list(commands.choices) == [name]  # type: ignore[attr-defined]
