"""The package's shape: every module imports, no import cycle, and no module imports a higher layer than its own.

Imports are read with `ast` from the source (module-level and inside functions alike), so a lazy import counts.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = (
    ("foundation", ("diffmem", "diffmem.errors", "diffmem.config", "diffmem.registry", "diffmem.console",
                    "diffmem.io")),
    ("models", ("diffmem.models",)),
    ("measures", ("diffmem.measures",)),
    ("methods", ("diffmem.detectors", "diffmem.explanation", "diffmem.mitigate", "diffmem.training")),
    ("harnesses", ("diffmem.testbed", "diffmem.runs")),
    ("app", ("diffmem.app",)),
    ("cli", ("diffmem.cli",)),
)
"""Lowest first: a module may import its own layer and those below, never one above. A name covers its
submodules, and the longest name that matches a module decides its layer."""


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((SRC / "diffmem").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The diffmem modules `name` imports anywhere in its source (`from pkg import submodule` counts as the
    submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer(module: str) -> int:
    """The index in `LAYERS` of the longest name covering `module`."""
    best = max(((len(prefix), i) for i, (_, names) in enumerate(LAYERS) for prefix in names
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best[1]


@pytest.mark.parametrize("module", [m for m in MODULES if not m.endswith("__main__")])
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_no_module_imports_a_higher_layer() -> None:
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a, deps in GRAPH.items() for b in sorted(deps) if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_loading_does_not_know_the_testbed() -> None:
    """`load_pipeline("testbed")` resolves through `diffmem.registry`, filled by the package root."""
    assert not {m for m in GRAPH["diffmem.models.loading"] if m.startswith("diffmem.testbed")}
    assert GRAPH["diffmem"] == {"diffmem.registry"}


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components of the import graph: every one must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in GRAPH[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                component.append(stack.pop())
                if component[-1] == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_command_groups_share_only_the_common_module() -> None:
    """Each `diffmem.cli` group module imports no other group: what they share lives in `diffmem.cli.common`."""
    groups = {m for m in MODULES if m.startswith("diffmem.cli.") and m not in ("diffmem.cli.common",
                                                                                "diffmem.cli.__main__")}
    crossing = [f"{m} imports {d}" for m in sorted(groups) for d in sorted(GRAPH[m]) if d in groups]
    assert not crossing, "\n".join(crossing)


def test_public_names_and_console_script_resolve() -> None:
    import diffmem
    import diffmem.mitigate
    from diffmem.cli.common import DType
    from diffmem.models.loading import DTYPES

    for module in (diffmem, diffmem.mitigate):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    script = re.search(r'^diffmem = "(.+)"$', (SRC.parent / "pyproject.toml").read_text(), re.MULTILINE)
    assert script is not None, "pyproject.toml names no `diffmem` console script"
    module_name, _, attr = script.group(1).partition(":")
    assert callable(getattr(importlib.import_module(module_name), attr))
    assert [d.value for d in DType] == list(DTYPES)
