"""The package's shape, checked: no import cycles, no private names imported across modules, no long functions.

Walked with the standard library's `ast`, so the check sees every import, also those inside functions (a cycle
hidden in a function-level import is still a cycle in the design)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "runtime" / "phi3v_ort"
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = ["phi3v_ort", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def resolve(name: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of a phi3v_ort module."""
    found = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("phi3v_ort")]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, node)
            if not target.startswith("phi3v_ort"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
    return found


def test_no_module_imports_a_private_name_of_another():
    offenders = [f"{name}:{line} imports {target}.{attr}"
                 for name in MODULES for target, attr, line in imports(name)
                 if attr and attr.startswith("_") and not attr.startswith("__") and target != name]
    assert not offenders, "\n".join(offenders)


def test_there_is_no_import_cycle():
    graph = {name: sorted({t for t, _, _ in imports(name) if t in MODULES and t != name}) for name in MODULES}
    # a package's __init__ importing its own submodules (cli/__init__ registers the commands) is not a cycle
    # through the submodules that import the package's siblings by their full names
    for name in graph:
        if MODULES[name].name == "__init__.py":
            graph[name] = [t for t in graph[name] if not t.startswith(name + ".")]
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_function_in_the_runtime_is_over_80_lines():
    long = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_the_walk_sees_the_whole_package():
    """The checks above are only as good as the walk: it must see the modules and their imports."""
    assert {"phi3v_ort.engine.conversation", "phi3v_ort.server.app", "phi3v_ort.cli.run"} <= set(MODULES)
    assert ("phi3v_ort.errors", "Phi3vError") in {(t, a) for t, a, _ in imports("phi3v_ort.engine.model")}
