"""The house as issue 17 drew it: four wings along the data's path, imports one way, no circle, small rooms."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fluxdemo"
# Each module's floor: an import may point into the same floor or a lower one, never up.
FLOORS = {"model": 1, "lora": 2, "pipeline": 3, "serve": 4, "studio": 5, "flags": 5, "cli": 6, "__main__": 7}
BIG_ALLOWED = {"model/tiny.py"}  # the tiny-kit builder: one table-like recipe per component
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES = 450, 60, 300


def modules() -> dict[str, Path]:
    return {".".join(("fluxdemo", *p.relative_to(PACKAGE).with_suffix("").parts)): p for p in PACKAGE.rglob("*.py")}


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS.get(parts[1], 0) if len(parts) > 1 else 0  # bottom: errors, files, untrusted, lru, headers


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported fluxdemo module, whether the import is inside a function) for every import in a file."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
             for n in ast.walk(f)}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fluxdemo"):
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            known = [t for t in targets if t in modules()] or [node.module]
            found += [(t, id(node) in inner) for t in known]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in inner) for a in node.names if a.name.startswith("fluxdemo")]
    return found


@pytest.mark.parametrize("module", sorted(modules()))
def test_every_import_points_into_the_same_or_a_lower_wing(module: str) -> None:
    up = [target for target, _ in imports(modules()[module]) if floor(target) > floor(module)]
    assert up == [], f"{module} imports from a higher wing: {up}"


def test_no_import_circle_between_modules() -> None:
    known = modules()
    graph = {m: {t for t, inner in imports(p) if not inner and t in known and t != m} for m, p in known.items()}
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}  # a package's own face
    done, path = set(), []

    def visit(m: str) -> None:
        assert m not in path, "import circle: " + " -> ".join([*path[path.index(m) :], m])
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


@pytest.mark.parametrize("module", sorted(modules()))
def test_rooms_are_small(module: str) -> None:
    path = modules()[module]
    name = path.relative_to(PACKAGE).as_posix()
    lines = len(path.read_text().splitlines())
    assert name in BIG_ALLOWED or lines <= MAX_MODULE_LINES, f"{name} has {lines} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        size = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert size <= MAX_FUNCTION_LINES, f"{name}: {node.name} has {size} lines"
        elif isinstance(node, ast.ClassDef):
            assert size <= MAX_CLASS_LINES, f"{name}: class {node.name} has {size} lines"


def test_no_test_module_imports_another() -> None:
    """Shared builders live in helper modules (tests/helpers.py, lora_factory.py, fake_hub.py, hostile.py)."""
    found = []
    for path in [*PACKAGE.parent.joinpath("tests").glob("*.py"), *PACKAGE.parent.joinpath("bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert found == []
