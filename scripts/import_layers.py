"""The farm's import rules, checked on the source (nothing is imported or run).

The package reads as its data flow; each layer may import only from layers before it (or from
itself), so a reader knows what a module may touch:

    errors → files → models → sweep → render → runs → score → train → cluster → cli, bench

- a module never imports from a later layer (lazy imports inside functions count too);
- no import cycles between modules, inside a layer either;
- Ray is imported only by the cluster layer and the two entry points (cli, bench): everything
  else imports and tests without it.

Usage: python scripts/import_layers.py [PACKAGE_DIR]   (default: farm/ next to this script)
Prints one line per broken rule and exits 1, or exits 0 silently.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS = ["errors", "files", "models", "sweep", "render", "runs", "score", "train", "cluster", "cli", "bench"]
RAY_ALLOWED = {"cluster", "cli", "bench"}
ENTRY_POINTS = {"cli", "bench"}  # the same rank: neither imports the other


def module_name(package: Path, path: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every absolute module name the file imports, with its line, wherever the import sits."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from farm.x import y` may name the submodule y
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def check(package: Path) -> list[str]:
    package = package.resolve()
    root = package.name
    files = {module_name(package, path): path for path in sorted(package.rglob("*.py"))}
    problems = []
    graph: dict[str, set[str]] = {name: set() for name in files}
    for module, path in files.items():
        rel = path.relative_to(package.parent)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        layer = layer_of(module)
        for target, line in imported_names(tree, module, path.name == "__init__.py"):
            top = target.split(".")[0]
            if top == "ray" and layer not in RAY_ALLOWED:
                problems.append(f"{rel}:{line}: imports Ray outside the cluster layer ({target})")
            if top != root or target not in files or target == module:
                continue
            graph[module].add(target)
            other = layer_of(target)
            if not layer or not other or other == layer:
                continue
            if layer not in LAYERS or other not in LAYERS:
                problems.append(f"{rel}:{line}: {module} or {target} is in no known layer ({', '.join(LAYERS)})")
            elif LAYERS.index(other) > LAYERS.index(layer) or (other in ENTRY_POINTS and layer in ENTRY_POINTS):
                problems.append(f"{rel}:{line}: {module} ({layer}) imports {target} from a later layer ({other})")
    for cycle in find_cycle(graph):
        problems.append(f"{package.name}: import cycle between {', '.join(cycle)}")
    return sorted(set(problems))


def main(argv: list[str]) -> int:
    package = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "farm"
    problems = check(package)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
