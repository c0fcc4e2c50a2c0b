"""The project's own import graph, read from the source with `ast` (nothing is imported).

A node is a subpackage (`rlhf_ray.ppo`), a top-level module (`rlhf_ray.config`), `actors` or `cli`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rlhf_ray", "actors")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module, dotted
    where: str  # file:line of the import statement
    local: bool  # inside a function body


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def node_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "actors":
        return "actors"
    if module == "rlhf_ray.cli":
        return "cli"
    return ".".join(parts[:2])


def own_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _longest_module(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]


def _function_local(tree: ast.Module) -> set[ast.AST]:
    inside: set[ast.AST] = set()
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(ast.walk(function))
    return inside


def edges() -> list[Edge]:
    modules = own_modules()
    found: dict[tuple[str, str, int], Edge] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        local = _function_local(tree)
        for node in ast.walk(tree):
            for name in _imported_names(node, module, path.name == "__init__.py"):
                target = _longest_module(name, modules) if name.split(".")[0] in PACKAGES else None
                if target and target != module:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.setdefault((module, target, node.lineno), Edge(module, target, where, node in local))
    return list(found.values())


def package_edges(all_edges: list[Edge]) -> dict[tuple[str, str], list[Edge]]:
    by_pair: dict[tuple[str, str], list[Edge]] = {}
    for edge in all_edges:
        pair = (node_of(edge.source), node_of(edge.target))
        if pair[0] != pair[1]:
            by_pair.setdefault(pair, []).append(edge)
    return by_pair
