"""The import graph of our packages, read from the source (no imports run): no cycles, and the layers hold.

Every ``import`` / ``from ... import`` statement in pipeline/, preprocess/, train/ and infra/ counts, at module level
or inside a function (a lazy import is still a dependency). ``from a.b import c`` is an edge to ``a.b.c`` when that is
one of our modules, else to ``a.b``. Importing ``a.b`` also runs ``a/__init__.py``; that implicit edge is left out,
since every package's ``__init__`` is read as a module of its own.

Layers, bottom to top: ``pipeline`` (the library) ← ``preprocess``, ``train`` (the stages, each apart) ← ``infra``
(the local stack, job submission and the ``longplay`` command tree). ``pipeline/models/*`` (and
``pipeline/diffusion.py``, which the conditioning wrapper uses) import only torch, numpy, the standard library and
each other.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "preprocess", "train", "infra")
ALLOWED = {  # package -> the packages it may import (besides itself)
    "pipeline": set(),
    "preprocess": {"pipeline"},
    "train": {"pipeline"},
    "infra": {"pipeline", "preprocess", "train"},
}
MODEL_IMPORTS = {"torch", "numpy"}  # besides the standard library and pipeline.models
TORCH_ONLY = {"pipeline.diffusion"}  # maths the models bind to (conditioning's CFG): held to the models' rule
# Edges that break a rule today, each with what removes it. The test fails when one is gone, so the list shrinks.
PENDING: dict[tuple[str, str], str] = {}  # (module, target) edges still to remove, with the callers that keep them


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, ours: set[str]) -> set[str]:
    """Every module ``name`` imports (ours and others'), by absolute dotted name."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                out.add(child if child in ours else base)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _ours(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between our modules only, the pending ones left out."""
    return {m: {t for t in targets if t in graph and (m, t) not in PENDING} for m, targets in graph.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges)))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_the_graph_is_read(graph):
    """The walk sees the modules and edges we know are there (so the tests below are not vacuous)."""
    assert {"pipeline.components", "preprocess.encode", "train.components", "infra.cli"} <= set(graph)
    assert "pipeline.components" in graph["preprocess.encode"]
    assert "pipeline.components" in graph["train.components"]
    assert {"infra.stack", "pipeline.commands", "train.cli", "preprocess.cli", "infra.demo"} <= graph["infra.cli"]
    assert "torch" in graph["pipeline.models.autoencoder"]


def test_no_import_cycles(graph):
    assert _cycles(_ours(graph)) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_layers_import_only_downwards(graph):
    wrong = []
    for module, targets in _ours(graph).items():
        package = module.split(".")[0]
        wrong += [f"{module} -> {t}" for t in sorted(targets) if t.split(".")[0] not in ALLOWED[package] | {package}]
    assert wrong == []


def _torch_only(module: str) -> bool:
    return module.startswith("pipeline.models") or module in TORCH_ONLY


def test_models_import_only_torch_numpy_and_the_standard_library(graph):
    wrong = []
    for module, targets in graph.items():
        if _torch_only(module):
            for target in sorted(targets):
                top = target.split(".")[0]
                ok = top in MODEL_IMPORTS or top in sys.stdlib_module_names or _torch_only(target)
                if not ok and (module, target) not in PENDING:
                    wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_pending_exceptions_are_still_needed(graph):
    """Each PENDING edge must still exist: once its callers have moved, delete the edge and its entry here."""
    assert [edge for edge in PENDING if edge[1] not in graph.get(edge[0], set())] == []
