"""The layers README's Architecture section shows are the layers the imports form: no package imports one
above it (module-level and deferred imports alike; ``TYPE_CHECKING`` blocks excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package -> the packages it may import (README, "Architecture"); every edge points down a layer
ALLOWED = {
    "core": set(),
    "graphdb": {"core"},
    "merger": {"core"},
    "crawler": {"core", "graphdb"},
    "world": {"core", "merger"},
    "calibration": {"core", "graphdb", "merger", "crawler", "world"},
    "planner": {"core", "graphdb", "merger", "crawler", "world", "calibration"},
    "evaluation": {"core", "graphdb", "merger", "crawler", "world", "calibration", "planner"},
    "deploy": {"core", "graphdb", "merger", "crawler", "world", "calibration", "planner", "evaluation"},
}


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # annotations only
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
        found |= _imports(node)
    return found


def package_imports() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the files that import it."""
    graph: dict[str, dict[str, set[str]]] = {p: {} for p in ALLOWED}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            for target in _imports(ast.parse(path.read_text(encoding="utf-8"))) & set(ALLOWED) - {package}:
                graph[package].setdefault(target, set()).add(str(path.relative_to(ROOT)))
    return graph


def test_imports_only_point_down_the_layers() -> None:
    graph = package_imports()
    upward = {
        f"{src} -> {dst} ({', '.join(sorted(files))})"
        for src, targets in graph.items()
        for dst, files in targets.items()
        if dst not in ALLOWED[src]
    }
    assert not upward, "imports against the layers in README's Architecture section: " + "; ".join(sorted(upward))
    assert graph["deploy"] and not graph["core"]  # the walk sees imports at all


def test_the_graph_contract_does_not_import_its_implementations() -> None:
    tree = ast.parse((ROOT / "graphdb" / "store.py").read_text(encoding="utf-8"))
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and (m.startswith("graphdb.embedded") or m.startswith("graphdb.neo4j")) for m in modules)


def test_product_packages_hold_no_test_scaffolding() -> None:
    """Test-only fakes live under ``tests/`` (demo assets in ``deploy/``): no product module is named
    ``testing*`` and none imports ``tests``, so installing the product ships no scaffolding."""
    named = sorted(str(p.relative_to(ROOT)) for package in ALLOWED for p in (ROOT / package).rglob("testing*"))
    assert not named, f"test scaffolding inside product packages: {named}"
    importers = sorted(
        str(path.relative_to(ROOT))
        for package in ALLOWED
        for path in (ROOT / package).rglob("*.py")
        if "tests" in _imports(ast.parse(path.read_text(encoding="utf-8")))
    )
    assert not importers, f"product modules importing tests: {importers}"
