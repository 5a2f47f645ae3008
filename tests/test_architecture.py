"""The package's layout rules, checked over its import graph (with ``ast``).

``.ci/run`` also runs import-linter's layers contract (``pyproject.toml``); these
tests add what a layers contract does not say: no import cycle at all (imports
inside functions included), ``argparse`` only under ``cli/``, ``keras.src`` only in
``naming.py`` (the one compatibility module), and no module over ~450 lines
except ``losses.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "keras_ce_plugin"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
# Keras' internals, named as in the modules that import them.
_KERAS_SRC = "keras.src"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth of its code), absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` depends on pkg.sub (a module) or on pkg (a name in it).
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in MODULES else module)
    return found


def _internal_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {m for m in _imports(path) if m in MODULES and m != name}
    return graph


def test_the_layout_exists():
    for name in ("keras_ce_plugin.cli", "keras_ce_plugin.training", "keras_ce_plugin.export"):
        assert name in MODULES, f"{name} is missing"


def test_no_import_cycle_between_submodules():
    """A cycle anywhere below the package root (the root re-exports; it is left out)."""
    graph = {
        k: {m for m in v if m != "keras_ce_plugin"}
        for k, v in _internal_graph().items()
        if k != "keras_ce_plugin"
    }
    # A package imports its own submodules to re-export them; a submodule importing its
    # parent package is the back edge that would close a cycle, so both directions count.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_argparse_only_under_cli(name):
    if name.startswith("keras_ce_plugin.cli"):
        return
    assert "argparse" not in _imports(MODULES[name]), f"{name} imports argparse"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_keras_internals_only_in_naming(name):
    if name == "keras_ce_plugin.naming":
        return
    internal = sorted(m for m in _imports(MODULES[name]) if m.startswith(_KERAS_SRC))
    assert not internal, f"{name} imports {internal}; only naming.py may"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    if name == "keras_ce_plugin.losses":
        return
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines (split it by concern)"


@pytest.mark.parametrize(
    "upper, lower",
    [
        ("keras_ce_plugin.training", "keras_ce_plugin.cli"),
        ("keras_ce_plugin.export", "keras_ce_plugin.cli"),
        ("keras_ce_plugin.losses", "keras_ce_plugin.training"),
        ("keras_ce_plugin.losses", "keras_ce_plugin.export"),
        ("keras_ce_plugin.naming", "keras_ce_plugin.training"),
        ("keras_ce_plugin.models", "keras_ce_plugin.training"),
        ("keras_ce_plugin.data", "keras_ce_plugin.training"),
    ],
)
def test_data_flows_one_way(upper, lower):
    """``lower`` (nearer the user) may import ``upper``, never the reverse."""
    offenders = sorted(
        f"{name} imports {imported}"
        for name, path in MODULES.items()
        if name == upper or name.startswith(upper + ".")
        for imported in _imports(path)
        if imported == lower or imported.startswith(lower + ".")
    )
    assert not offenders, offenders
