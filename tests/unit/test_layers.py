"""The house rule: packages import only from packages below them, and nothing imports in a cycle.

An AST walk over src/rankone (no imports executed), so a forbidden import fails here whether or not
any test exercises the line it is on.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "rankone"

# What each package may import, lowest first. The engine (models, methods, artifacts, edit)
# never reads the testbed; lifecycle and trace never import each other or eval (lifecycle reads a
# testbed's relations to name the relation of an edit); eval sits above
# trace (it measures the layer sweeps the layer choice reads, and reads the case files tracing
# takes) and is the only package that reads testbed worlds, as case files; the CLI may import anything.
_ENGINE = ["core", "models", "methods", "artifacts", "edit"]
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "models": {"core"},
    "methods": {"core", "models"},
    "artifacts": {"core", "models", "methods"},
    "edit": set(_ENGINE[:4]),
    "testbed": {"core", "models"},
    "lifecycle": set(_ENGINE) | {"testbed"},
    "trace": set(_ENGINE),
    "eval": set(_ENGINE) | {"testbed", "trace"},
    "serve": set(_ENGINE) | {"lifecycle"},  # the live loop reads the registry; never eval, trace or the testbed
    "heal": set(_ENGINE) | {"lifecycle", "trace", "eval"},  # talks to a server over HTTP: never imports serve
    "cli": set(_ENGINE) | {"testbed", "lifecycle", "trace", "eval", "serve", "heal"},
}


def _package(module: str) -> str | None:
    """'rankone.methods.rome' -> 'methods'; the root package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "rankone" else None


def _module_name(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path, src).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the package the module lives in
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            # `from pkg import x`: x may be a module; module_cycles keeps only names of modules
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return [(n, m) for n, m in found if m == "rankone" or m.startswith("rankone.")]


def violations(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        mine = _package(_module_name(path, src))
        if mine is None:
            continue  # the root package: version and the lazy public API
        if mine not in ALLOWED:
            bad.append(f"{path.relative_to(src)}: package {mine!r} is not in the layering table")
            continue
        for line, mod in imports_of(path, src):
            theirs = _package(mod)
            if theirs is None or theirs == mine or not (src / theirs).exists():
                continue  # the root package, its own package, or a name imported from the root
            if theirs not in ALLOWED[mine]:
                bad.append(f"{path.relative_to(src)}:{line} ({mine}) imports {mod} ({theirs})")
    return bad


def module_cycles(src: Path = SRC) -> list[list[str]]:
    """Cycles in the module-level import graph (imports inside functions count too)."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p, src) for p in src.rglob("*.py")}
    for path in src.rglob("*.py"):
        me = _module_name(path, src)
        graph[me] = {m for _, m in imports_of(path, src) if m in modules and m != me and m != "rankone"}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def test_every_package_imports_only_downwards():
    assert violations() == []


def test_no_import_cycles():
    assert module_cycles() == []


def test_the_table_is_a_partial_order():
    # nothing may import a package that may import it back
    for pkg, deps in ALLOWED.items():
        assert all(pkg not in ALLOWED[d] for d in deps), pkg


def test_every_package_is_in_the_table_and_has_a_docstring():
    for pkg in sorted(p for p in SRC.iterdir() if (p / "__init__.py").is_file()):
        assert pkg.name in ALLOWED, pkg.name
        assert ast.get_docstring(ast.parse((pkg / "__init__.py").read_text())), pkg.name


@pytest.mark.parametrize("line, expect", [
    ("from rankone.cli.main import main", "imports rankone.cli.main (cli)"),
    ("from ..eval.metrics import score", "imports rankone.eval.metrics (eval)"),
    ("import rankone.edit.editor", "imports rankone.edit.editor (edit)"),
])
def test_a_forbidden_import_is_caught(tmp_path, line, expect):
    # a copy of the tree with one upward import added to core
    import shutil

    tree = tmp_path / "rankone"
    shutil.copytree(SRC, tree, ignore=shutil.ignore_patterns("builtin", "__pycache__"))
    target = tree / "core" / "tokens.py"
    target.write_text(target.read_text() + f"\n{line}\n")
    bad = violations(tree)
    assert bad and any(expect in b for b in bad) and all(b.startswith("core/tokens.py:") for b in bad), bad


def test_a_cycle_is_caught(tmp_path):
    import shutil

    tree = tmp_path / "rankone"
    shutil.copytree(SRC, tree, ignore=shutil.ignore_patterns("builtin", "__pycache__"))
    (tree / "core" / "atomic.py").write_text((tree / "core" / "atomic.py").read_text() + "\nfrom rankone.core import errors\n")
    (tree / "core" / "errors.py").write_text((tree / "core" / "errors.py").read_text() + "\nfrom rankone.core import atomic\n")
    assert any("rankone.core.errors" in c and "rankone.core.atomic" in c for c in module_cycles(tree))
