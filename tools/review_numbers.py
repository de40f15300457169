"""A reviewer's numbers for the product code, printed in one go.

    python tools/review_numbers.py            # from the repository root; exit 1 if a limit is passed

It reads the source with ``ast`` (nothing is imported, so it runs without the project installed)
and checks the limits the project holds itself to:

1. no class with more than 15 methods;
2. no function over 80 lines in the product folders;
3. no import cycle between product modules, counting imports inside functions;
4. no product module that nothing imports (entry points and package ``__init__`` files aside);
5. a README of at most 150 lines, with ``dflash-batch run`` in its first 60.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dflash_batch"
PRODUCT = ("decoder", "pipeline", "jobs", "schemas", "kernels")
MAX_METHODS, MAX_FUNCTION_LINES = 15, 80
README_LINES, RUN_WITHIN = 150, 60
# Modules a user or a runtime starts directly rather than by import.
ENTRY_POINTS = {f"{PACKAGE}.jobs.cli", f"{PACKAGE}.jobs.tpu_env",
                f"{PACKAGE}.decoder._memory_table"}  # regenerates docs/design.md's memory table


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def product_files() -> dict[str, Path]:
    files = {}
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            files[module_name(path)] = path
    return files


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:``: imports for annotations, never run."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imported_modules(tree: ast.AST, here: str, known: set[str], is_package: bool) -> set[str]:
    """Product modules that ``here`` imports, anywhere in the file (functions included)."""
    found = set()
    package = here if is_package else here.rpartition(".")[0]
    skip = type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # ``from pkg import mod`` names a module; ``from pkg.mod import f`` names its module.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != here:
                found.add(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan), each one cycle or more.

    Package ``__init__`` files are left out: they re-export their package's modules, so an edge
    into one is an edge into the module it re-exports, which the graph already has.
    """
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    files = product_files()
    known = set(files)
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in files.items()}
    problems = []

    big_classes = []
    long_functions = []
    for mod, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                if len(methods) > MAX_METHODS:
                    big_classes.append(f"{mod}.{node.name}: {len(methods)} methods")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{files[mod].relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    print(f"classes over {MAX_METHODS} methods: {len(big_classes)}")
    problems += big_classes
    for line in big_classes:
        print("  " + line)
    print(f"functions over {MAX_FUNCTION_LINES} lines: {len(long_functions)}")
    problems += long_functions
    for line in long_functions:
        print("  " + line)

    imports = {m: imported_modules(t, m, known, m in packages) for m, t in trees.items()}
    graph = {m: imports[m] - packages for m in trees if m not in packages}
    found = cycles(graph)
    print(f"import cycles (imports inside functions included): {len(found)}")
    for group in found:
        print("  " + " <-> ".join(group))
        problems.append(f"cycle {group}")

    used = set().union(*imports.values()) | ENTRY_POINTS
    orphans = sorted(m for m in known - used - packages)
    print(f"product modules without a caller: {len(orphans)}")
    for m in orphans:
        print("  " + m)
        problems.append(f"orphan {m}")

    readme = (ROOT / "README.md").read_text().splitlines()
    run_at = next((i + 1 for i, line in enumerate(readme) if re.search(r"dflash-batch run\b", line)), None)
    print(f"README: {len(readme)} lines (at most {README_LINES}); first 'dflash-batch run' on line {run_at} "
          f"(within {RUN_WITHIN})")
    if len(readme) > README_LINES or run_at is None or run_at > RUN_WITHIN:
        problems.append("README")
    print(f"modules: {len(files)}")
    print("OK" if not problems else f"{len(problems)} over the limits")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
