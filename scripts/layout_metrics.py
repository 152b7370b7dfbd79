"""The layout's numbers: module, function and class sizes, parameter counts, import cycles and two-way ties
between folders. `uv run python scripts/layout_metrics.py [--all]`.

Counts source lines of each node (decorators and docstrings included, blank lines too); parameters exclude
`self`/`cls` and count keyword-only ones. Import cycles are found over every module-level and function-level
`import posttrain...` (TYPE_CHECKING imports included, since a circle there is still a circle of concepts).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
LIMITS = {"module": 500, "function": 60, "class": 200, "parameters": 6}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")]) + bool(args.vararg) + bool(args.kwarg)


def sizes(path: Path) -> tuple[int, list[tuple[str, int, int]], list[tuple[str, int]]]:
    tree = ast.parse(path.read_text())
    functions, classes = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            functions.append((node.name, node.end_lineno - start + 1, _params(node)))
        elif isinstance(node, ast.ClassDef):
            classes.append((node.name, node.end_lineno - node.lineno + 1))
    return len(path.read_text().splitlines()), functions, classes


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("posttrain"):
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def folder_ties(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs of rooms that import each other, a room being a folder under a package (`pipeline/envs`, all of its
    modules together) or a module beside them (`pipeline/settings.py`): a two-way tie between folders is a
    circle of concepts even when no two modules form one."""

    def room(name: str) -> str:
        return ".".join(name.split(".")[:3])

    edges = {(room(a), room(b)) for a, targets in graph.items() for b in targets if room(a) != room(b)}
    return sorted((a, b) for a, b in edges if a < b and (b, a) in edges)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--all", action="store_true", help="list every module, not only the largest")
    args = parser.parse_args()
    found = modules()
    rows, functions, classes = [], [], []
    for name, path in found.items():
        lines, fns, cls = sizes(path)
        rows.append((lines, name))
        functions += [(n, f"{name}.{fn}", p) for fn, n, p in fns]
        classes += [(n, f"{name}.{c}") for c, n in cls]
    rows.sort(reverse=True)
    functions.sort(reverse=True)
    shown = rows if args.all else rows[:8]
    print(f"modules: {len(rows)}, {sum(r[0] for r in rows)} lines; largest:")
    for lines, name in shown:
        print(f"  {lines:5d}  {name}")
    print("largest functions:", ", ".join(f"{q} {n}" for n, q, _ in functions[:5]))
    print("most parameters:", ", ".join(f"{q} {p}" for _, q, p in sorted(functions, key=lambda f: -f[2])[:5]))
    print("largest classes:", ", ".join(f"{q} {n}" for n, q in sorted(classes, reverse=True)[:5]))
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    # A package's __init__ importing its own modules is not a circle of concepts.
    graph = {
        k: {v for v in vs if not k.startswith(v + ".") and not v.startswith(k + ".")}
        for k, vs in graph.items()
    }
    circles = cycles(graph)
    print(f"import circles: {len(circles)}", *(" <-> ".join(c) for c in circles), sep="\n  ")
    ties = folder_ties(graph)
    print(f"two-way folder ties: {len(ties)}", *(" <-> ".join(t) for t in ties), sep="\n  ")
    over = {
        "modules": [n for lines, n in rows if lines > LIMITS["module"]],
        "functions": [q for n, q, _ in functions if n > LIMITS["function"]],
        "classes": [q for n, q in classes if n > LIMITS["class"]],
        "parameters": [q for _, q, p in functions if p > LIMITS["parameters"]],
    }
    for what, names in over.items():
        print(f"over the limit ({what}): {len(names)}", *names[:20], sep="\n  " if names else "")
    return 0 if not any(over.values()) and not circles and not ties else 1


if __name__ == "__main__":
    sys.exit(main())
