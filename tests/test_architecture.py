"""The package's structure, checked from its source (ast): no import cycle, no private
name taken from another package, and dependencies pointing one way (DESIGN.md, "Layers").

Every import counts, also one inside a function: a lazy import still ties two modules.
The checks run on the real package and, to show that they can fail, on scratch copies
with a planted cycle, a planted private import and a planted upward import.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlmexport"

# Layers, bottom up. A module may import its own package and any package on a lower
# layer, never a package beside it on the same layer, never one above.
LAYERS = (
    ("core",),
    ("models", "bundle", "data", "assets"),
    ("runtimes",),
    ("evaluation",),
    ("exporter", "quant", "training"),
    ("pipeline",),
    ("serve", "plan"),
    ("cli", "__init__", "__main__"),
)
RANK = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}
# third-party packages only these top-level packages may import
ONLY = {"typer": {"cli"}, "rich": {"cli"}}


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted(root.rglob("*.py"))}


def _resolve(mods: dict[str, Path], current: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path) -> dict[str, list[tuple[str, str | None, int]]]:
    """module -> [(imported module, imported name or None, line)] for every import in it."""
    mods = modules(root)
    top = root.name
    out: dict[str, list[tuple[str, str | None, int]]] = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        found: list[tuple[str, str | None, int]] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(a.name, None, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mods, mod, is_pkg, node)
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    # `from pkg import submodule` imports the submodule; `from mod import name` the module
                    found.append((sub, None, node.lineno) if sub in mods else (target, a.name, node.lineno))
        out[mod] = [(m, n, line) for m, n, line in found if m == top or m.startswith(top + ".") or
                    m.split(".")[0] in ONLY]
    return out


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    g: dict[str, set[str]] = {m: set() for m in mods}
    for mod, found in imports(root).items():
        for target, _, _ in found:
            if target in mods and target != mod:
                g[mod].add(target)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def package_of(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def private_imports(root: Path) -> list[str]:
    """``_name`` imported by a module of another package (a directory) than the one defining it."""
    mods = modules(root)
    bad = []
    for mod, found in imports(root).items():
        here = mods[mod].parent
        for target, name, line in found:
            if name and name.startswith("_") and not name.startswith("__") and target in mods:
                if mods[target].parent != here and not (mods[target].name == "__init__.py"
                                                         and mods[target].parent == here):
                    bad.append(f"{mod}:{line} imports {name} from {target}")
    return bad


def layer_violations(root: Path) -> list[str]:
    bad = []
    for mod, found in imports(root).items():
        src = package_of(mod)
        if src not in RANK:
            bad.append(f"{mod}: package {src!r} has no layer in LAYERS; add it where it belongs")
            continue
        for target, _, line in found:
            third = target.split(".")[0]
            if third in ONLY:
                if src not in ONLY[third]:
                    bad.append(f"{mod}:{line} imports {third}, which only {sorted(ONLY[third])} may")
                continue
            if target == root.name:
                dst = "__init__"
            else:
                dst = package_of(target)
            if dst == src or dst not in RANK:
                continue
            if RANK[dst] > RANK[src]:
                bad.append(f"{mod}:{line} imports {target}: {src} sits below {dst}")
            elif RANK[dst] == RANK[src]:
                bad.append(f"{mod}:{line} imports {target}: {src} and {dst} are siblings and must not import each other")
    return bad


# ---------------------------------------------------------------------- the package
def test_no_import_cycle():
    assert cycles(graph(PACKAGE)) == []


def test_no_private_name_across_packages():
    assert private_imports(PACKAGE) == []


def test_dependencies_point_down():
    assert layer_violations(PACKAGE) == []


def test_runtime_side_needs_no_build_side():
    """What a device installs (bundle, runtimes) reaches nothing of exporter, quant, training or pipeline."""
    g = graph(PACKAGE)
    seen, todo = set(), [m for m in g if m.startswith(("vlmexport.bundle", "vlmexport.runtimes"))]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += g[m]
    build_side = sorted(m for m in seen if package_of(m) in ("exporter", "quant", "training", "pipeline", "cli"))
    assert build_side == []


# ---------------------------------------------------------------- the checks can fail
@pytest.fixture
def scratch(tmp_path):
    copy = tmp_path / "vlmexport"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (copy / "assets").mkdir()
    (copy / "assets" / "__init__.py").write_text("")
    return copy


def _plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_a_planted_cycle_is_found(scratch):
    assert cycles(graph(scratch)) == []
    _plant(scratch / "core" / "errors.py", "from .atomic import atomic_directory  # noqa")
    found = cycles(graph(scratch))
    assert found == [["vlmexport.core.atomic", "vlmexport.core.errors"]]


def test_a_planted_private_import_is_found(scratch):
    _plant(scratch / "quant" / "recipe.py", "from ..runtimes.llamacpp_lib import _BACKEND_READY  # noqa")
    assert private_imports(scratch) == [
        "vlmexport.quant.recipe:" + str(len((scratch / "quant" / "recipe.py").read_text().splitlines()))
        + " imports _BACKEND_READY from vlmexport.runtimes.llamacpp_lib"]


def test_a_planted_upward_or_sideways_import_is_found(scratch):
    _plant(scratch / "runtimes" / "pipeline.py", "from ..exporter import onnx_common  # noqa")
    _plant(scratch / "quant" / "recipe.py", "from ..exporter.onnx_common import OPSET  # noqa")
    _plant(scratch / "bundle" / "names.py", "import rich  # noqa")
    bad = layer_violations(scratch)
    assert any("runtimes.pipeline" in b and "runtimes sits below exporter" in b for b in bad)
    assert any("quant.recipe" in b and "siblings" in b for b in bad)
    assert any("bundle.names" in b and "imports rich" in b for b in bad)
    assert len(bad) == 3
