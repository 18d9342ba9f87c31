"""The layout is the architecture: imports flow one way, no cycles, no private names across
modules, small files and functions.

Layers, lowest first (a module may import its own part and the parts below it)::

    errors, utils, locks, raytools -> config | io -> data -> models -> artifacts
        -> inference -> evaluation -> training -> demo, bench -> cli

``config`` and ``io`` are both foundations and import neither each other nor anything above.
Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from scripts.layout_report import import_cycles

PACKAGE = Path(__file__).resolve().parents[1] / "medseg"

#: Layer of each top-level part of medseg.
LAYERS = {
    "errors": 0,
    "utils": 0,
    "locks": 0,  # stdlib only: folder locks (run folders, --out)
    "raytools": 0,
    "config": 1,
    "io": 1,
    "data": 2,
    "models": 3,
    "artifacts": 4,
    "inference": 5,
    "evaluation": 6,
    "training": 7,
    "demo": 8,
    "demo3d": 8,
    "bench3d": 8,
    "bench": 8,
    "bench_torch_reference": 8,  # standalone: imports torch, never medseg
    "cli": 9,
}
#: Pairs of parts on the same footing that must not import each other.
FORBIDDEN = {("config", "io"), ("io", "config")}
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, path.name == "__init__.py")
            found += [(target, a.name) for a in node.names]
    return [(m, n) for m, n in found if m == "medseg" or m.startswith("medseg.")]


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    """Module -> the medseg modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for target, name in _imports(module, path):
            full = f"{target}.{name}" if name else target
            dep = full if full in modules else target
            if dep != module:
                graph[module].add(dep)
    return graph


def test_every_part_is_known():
    parts = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if not p.name.startswith(("_", ".")) and p.name != "py.typed"
    }
    assert parts <= set(LAYERS), f"add new parts to LAYERS: {parts - set(LAYERS)}"


def test_imports_flow_one_way():
    violations = []
    for module, path in _modules().items():
        here = _part(module)
        if here is None:
            continue
        for target, _ in _imports(module, path):
            there = _part(target)
            if there is None or there == here:
                continue
            if LAYERS[there] > LAYERS[here] or (here, there) in FORBIDDEN:
                violations.append(f"{module} imports {target}")
    assert not violations, "\n".join(violations)


def test_inference_and_evaluation_never_import_training():
    bad = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        if _part(m) in ("inference", "evaluation", "artifacts")
        for d in deps
        if _part(d) == "training"
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    cycles = import_cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    bad = []
    modules = _modules()
    for module, path in modules.items():
        for target, name in _imports(module, path):
            if target == module:
                continue
            private = [p for p in target.split(".") if p.startswith("_") and p != "__init__"]
            if private or (name and name.startswith("_") and f"{target}.{name}" not in modules):
                bad.append(f"{module} imports {target}:{name}")
    assert not bad, "\n".join(bad)


def test_files_and_functions_are_small():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        lines = path.read_text().count("\n")
        if lines > MAX_FILE_LINES:
            too_long.append(f"{rel}: {lines} lines (max {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "\n".join(too_long)
