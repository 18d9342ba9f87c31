#!/usr/bin/env python
"""Print the code layout's figures as JSON: import edges between packages, the largest files and
functions, imports inside functions, and module import cycles.

It reads the syntax trees only (nothing is imported), so it runs on any checkout::

    python scripts/layout_report.py [PACKAGE_DIR]     # default: medseg/ of this checkout
"""

from __future__ import annotations

import ast
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components


def _module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _inside_function(tree: ast.AST) -> set[int]:
    ids = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            ids |= {id(n) for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)}
    return ids


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module: the import cycles."""
    names = sorted(set(graph) | {w for deps in graph.values() for w in deps})
    at = {name: i for i, name in enumerate(names)}
    edges = [(at[v], at[w]) for v, deps in graph.items() for w in deps]
    rows, cols = zip(*edges, strict=True) if edges else ((), ())
    adjacency = csr_matrix((np.ones(len(edges)), (rows, cols)), shape=(len(names),) * 2)
    _, labels = connected_components(adjacency, directed=True, connection="strong")
    groups = [[n for n, lab in zip(names, labels, strict=True) if lab == g] for g in set(labels)]
    return sorted(g for g in groups if len(g) > 1)


def report(root: Path) -> dict:
    modules = {_module(p, root): p for p in sorted(root.rglob("*.py"))}
    edges: Counter = Counter()
    graph: dict[str, set[str]] = {}
    files, functions, in_function = [], [], 0
    for mod, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text)
        nested = _inside_function(tree)
        files.append((text.count("\n"), str(path.relative_to(root.parent))))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                functions.append((length, f"{mod}.{node.name}"))
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            else:
                t = _target(node, mod, path.name == "__init__.py")
                targets = [(t, a.name) for a in node.names]
            targets = [(t, a) for t, a in targets if t.split(".")[0] == root.name]
            if targets and id(node) in nested:
                in_function += 1
            for t, a in targets:
                full = f"{t}.{a}" if a and f"{t}.{a}" in modules else t
                if full != mod:
                    graph.setdefault(mod, set()).add(full)
                here, there = mod.split(".")[1:2], full.split(".")[1:2]
                if here and there and here != there:
                    edges[f"{here[0]} -> {there[0]}"] += 1
    files.sort(reverse=True)
    functions.sort(reverse=True)
    return {
        "package": str(root),
        "modules": len(modules),
        "lines": sum(n for n, _ in files),
        "largest_files": [f"{p}: {n}" for n, p in files[:8]],
        "files_over_600": sum(n > 600 for n, _ in files),
        "longest_functions": [f"{f}: {n}" for n, f in functions[:8]],
        "functions_over_100": sum(n > 100 for n, _ in functions),
        "imports_inside_functions": in_function,
        "cycles": import_cycles(graph),
        "package_edges": dict(sorted(edges.items())),
        "inference_or_evaluation_to_training": sum(
            v
            for k, v in edges.items()
            if k.split(" -> ")[0] in ("inference", "evaluation") and k.endswith("training")
        ),
    }


if __name__ == "__main__":
    pkg = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "medseg"
    print(json.dumps(report(pkg.resolve()), indent=1))
