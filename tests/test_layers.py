"""The layer contract (docs/design.md §1), checked on every import statement in the package.

Every ``import`` of a kvstore module, at module level, inside a function or under
``TYPE_CHECKING``, must go from a component to itself or to a component listed
for it below; no exceptions. And no chain of imports, function-level ones
included, may lead a module back to itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FOUNDATION = {"kvstore.errors", "kvstore._version", "kvstore.layout", "kvstore.keys",
              "kvstore._proto", "kvstore._frames", "kvstore.arena_file", "kvstore.arena_slots",
              "kvstore._progress", "kvstore.device_checksum", "kvstore.copy_threads"}
# component -> the components it may import (besides itself). Read bottom-up: each
# layer may use the ones above it in this table.
ALLOWED: dict[str, set[str]] = {
    # foundation: the error vocabulary, keys, layout, the wire and the arena file format
    "kvstore.errors": set(),
    "kvstore._version": set(),
    "kvstore.layout": {"kvstore.errors"},
    "kvstore.keys": {"kvstore.errors", "kvstore.layout"},
    "kvstore._proto": set(),
    "kvstore._frames": {"kvstore.errors", "kvstore._proto"},
    "kvstore.arena_file": {"kvstore.errors"},
    # slot/lease bookkeeping shared by the DRAM arena and the GPU tier (no I/O)
    "kvstore.arena_slots": {"kvstore.errors", "kvstore.keys", "kvstore.arena_file"},
    "kvstore._progress": set(),  # progress bars on a terminal's stderr (rich)
    "kvstore.device_checksum": set(),  # the chunk checksum computed on CPU and GPU alike
    # same-host copies and checksums split across cores (client put/get, daemon commit)
    "kvstore.copy_threads": {"kvstore.errors"},
    # below the codec: configuration, model knowledge, Triton kernels
    "kvstore.config": {"kvstore.errors"},
    "kvstore.config_doc": {"kvstore.config"},  # the reference generated from the config
    "kvstore.logs": set(),  # log line formats (text, JSON)
    "kvstore.models": {"kvstore.errors", "kvstore.layout"},
    "kvstore.kernels": {"kvstore.errors", "kvstore.models", "kvstore.device_checksum"},
    # the daemon, bottom-up
    "kvstore.codec": FOUNDATION | {"kvstore.kernels", "kvstore.models"},
    "kvstore.arena": FOUNDATION,
    "kvstore.tiers": FOUNDATION | {"kvstore.config", "kvstore.codec", "kvstore.arena"},
    "kvstore.quotas": FOUNDATION | {"kvstore.config"},
    "kvstore.engine": FOUNDATION | {"kvstore.config", "kvstore.codec", "kvstore.tiers",
                                    "kvstore.quotas"},
    "kvstore.server": FOUNDATION | {"kvstore.config", "kvstore.codec", "kvstore.tiers",
                                    "kvstore.engine", "kvstore.quotas", "kvstore.logs"},
    # the client side: no config, tiers, engine, server or kernels
    # kernels: only the device-to-device chunk copy of get(device="cuda"), imported when
    # a caller asks for device output (tests/client/test_imports.py: a plain client
    # loads neither torch nor triton)
    "kvstore.client": FOUNDATION | {"kvstore.codec", "kvstore.kernels"},
    "kvstore.integrations": FOUNDATION | {"kvstore.models", "kvstore.client"},
    "kvstore.sparse": FOUNDATION | {"kvstore.models", "kvstore.kernels", "kvstore.codec",
                                    "kvstore.client"},
    "kvstore.rag": FOUNDATION | {"kvstore.models", "kvstore.integrations", "kvstore.client"},
    # entry points
    "kvstore.stats_table": FOUNDATION,  # Prometheus figures as tables (kvstore stats)
    "kvstore.cli": FOUNDATION | {"kvstore.config", "kvstore.config_doc", "kvstore.logs",
                                 "kvstore.codec", "kvstore.server", "kvstore.client",
                                 "kvstore.stats_table"},
    "kvstore.__main__": {"kvstore.cli"},
    "kvstore": {"kvstore.errors", "kvstore._version", "kvstore.layout", "kvstore.client"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":  # installed as kvstore.kernels
        parts.insert(0, "kvstore")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    paths = [*(ROOT / "kvstore").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    return {_module_name(p): p for p in paths if "__pycache__" not in p.parts}


SOURCES = _sources()


def _imports(name: str, path: Path) -> set[str]:
    """kvstore modules (or packages) named by every import statement of ``path``."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in SOURCES else base)
    return {m for m in found if m == "kvstore" or m.startswith("kvstore.")}


def _component(module: str) -> str:
    matches = [c for c in ALLOWED if module == c or module.startswith(c + ".")]
    if not matches:
        raise AssertionError(f"{module} belongs to no component of the layer contract; add it")
    return max(matches, key=len)


GRAPH = {name: _imports(name, path) for name, path in SOURCES.items()}


def test_contract_table_is_a_dag_of_known_components() -> None:
    for component, allowed in ALLOWED.items():
        assert allowed <= set(ALLOWED), (component, allowed - set(ALLOWED))
    _assert_acyclic({c: set(a) for c, a in ALLOWED.items()}, "component")


def test_every_module_belongs_to_a_component() -> None:
    assert len(SOURCES) > 80
    for module in SOURCES:
        _component(module)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_every_import_follows_the_layer_contract(module: str) -> None:
    source = _component(module)
    bad = sorted(f"{target} ({_component(target)})" for target in GRAPH[module]
                 if _component(target) not in ALLOWED[source] | {source})
    assert not bad, f"{module} ({source}) may not import {bad}; allowed: {sorted(ALLOWED[source])}"


def test_no_import_cycles_also_through_function_level_imports() -> None:
    graph = {m: {t for t in targets if t in SOURCES and t != m} for m, targets in GRAPH.items()}
    _assert_acyclic(graph, "module")


def _assert_acyclic(graph: dict[str, set[str]], what: str) -> None:
    """Fail with one cycle if the directed graph has any."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError(f"{what} import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_checker_sees_function_level_and_type_checking_imports() -> None:
    assert "kvstore.client" in GRAPH["kvstore"]  # the lazy __getattr__ import
    assert "kvstore.engine" in GRAPH["kvstore.server.service"]  # under TYPE_CHECKING
    assert "kvstore.kernels.kvq_decode" in GRAPH["kvstore.codec.gpu"]  # inside a function
