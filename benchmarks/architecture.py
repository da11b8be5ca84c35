"""A census of the package's shape: modules, imports that climb from the library into the CLI, imports of
the package root from inside it, import cycles, the longest functions and the largest modules.

    python -m benchmarks.architecture            # prints it; tests/test_architecture.py guards the first three
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "hmt"


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(("hmt", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")


def census(root: Path = ROOT) -> dict:
    """The import graph (every import counts: module level, inside functions and for type checking)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    functions: list[tuple[int, str]] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(
                        parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])
                    )
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
        graph[name] = {d for d in found if d in modules and d != name}
    return {
        "modules": len(modules),
        "lines": sum(len(p.read_text().splitlines()) for p in modules.values()),
        "library_imports_cli": sorted(
            (m, d)
            for m, ds in graph.items()
            for d in ds
            if not m.startswith("hmt.cli") and d.startswith("hmt.cli")
        ),
        "root_imported_by": sorted(
            m for m, ds in graph.items() if "hmt" in ds and not m.startswith("hmt.cli")
        ),
        "cycles": _cycles(graph),
        "longest_functions": sorted(functions, reverse=True)[:10],
        "largest_modules": sorted(
            ((len(p.read_text().splitlines()), m) for m, p in modules.items()), reverse=True
        )[:6],
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


if __name__ == "__main__":
    for key, value in census().items():
        print(f"{key}: {value}")
