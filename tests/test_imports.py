"""Imports flow one way: config -> io -> data -> models -> training/inference -> demo -> cli."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medseg"

# Layer of each top-level part; a module may import only from its own layer or lower ones.
LAYERS = {
    "errors": 0,
    "utils": 0,
    "config": 1,
    "io": 1,
    "data": 2,
    "models": 3,
    "training": 4,
    "inference": 5,
    "demo": 6,
    "bench": 6,
    "bench_torch_reference": 6,  # standalone: imports torch, never medseg
    "cli": 7,
}
# config and io are both foundations, but neither may import the other.
FORBIDDEN = {("config", "io"), ("io", "config")}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "medseg" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_every_part_is_known():
    parts = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if not p.name.startswith(("_", ".")) and p.name != "py.typed"
    }
    assert parts <= set(LAYERS), f"add new parts to LAYERS: {parts - set(LAYERS)}"


def test_imports_flow_one_way():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        here = rel.parts[0].removesuffix(".py")
        if here.startswith("_"):
            continue
        for module in _imports(path):
            there = _part(module)
            if there is None or there.startswith("_") or there == here:
                continue
            if LAYERS[there] > LAYERS[here] or (here, there) in FORBIDDEN or there == "cli":
                violations.append(f"{rel} imports {module}")
    assert not violations, "\n".join(violations)
