"""Numbers the structure is held to: the largest function and class, import cycles, and the
modules without a test file of their own.

    python tools/structure_metrics.py [ROOT]

A function's length counts its lines from `def` to its last statement (docstring included);
a class's the same. An import cycle is a strongly connected component of the graph of
`rlhf_pipe` modules and the modules they import anywhere (function-level imports included,
since those only hide a cycle). A module "has logic" when it defines a function or class.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def _modules(pkg: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(pkg.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(tree: ast.AST, name: str, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main(root: Path) -> None:
    pkg = root / "rlhf_pipe"
    mods = _modules(pkg)
    graph, funcs, classes, with_logic = {}, [], [], []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = _imports(tree, name, set(mods))
        has_logic = False
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                has_logic = True
                size = node.end_lineno - node.lineno + 1
                where = f"{path.relative_to(root)}:{node.lineno} {node.name}"
                (classes if isinstance(node, ast.ClassDef) else funcs).append((size, where))
        if has_logic and path.name != "__init__.py" and path.name != "__main__.py":
            with_logic.append(path)
    funcs.sort(reverse=True)
    classes.sort(reverse=True)
    tests = {p.name for p in (root / "tests").rglob("test_*.py")}
    mirrored = {
        p
        for p in with_logic
        if (root / "tests" / p.parent.relative_to(pkg) / f"test_{p.stem}.py").exists()
    }
    named = {p for p in with_logic if f"test_{p.stem}.py" in tests}
    print(f"largest functions: {', '.join(f'{s} lines {w}' for s, w in funcs[:3])}")
    print(f"functions over 60 lines: {sum(s > 60 for s, _ in funcs)}")
    print(f"largest classes: {', '.join(f'{s} lines {w}' for s, w in classes[:3])}")
    print(f"classes over 250 lines: {sum(s > 250 for s, _ in classes)}")
    cycles = _cycles(graph)
    print(f"import cycles: {len(cycles)} {cycles if cycles else ''}")
    print(
        f"modules with logic: {len(with_logic)}; with a test file of the same name anywhere: "
        f"{len(named)}; at the mirrored path tests/<package path>/test_<module>.py: "
        f"{len(mirrored)}"
    )
    missing = sorted(str(p.relative_to(root)) for p in set(with_logic) - mirrored)
    print(f"without a mirrored test file ({len(missing)}): {', '.join(missing)}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
