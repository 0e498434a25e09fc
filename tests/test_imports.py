"""Imports flow one way (entry points → training/evaluation → set-up → models, rollout, algorithms, constraints):
the package's own import statements — at module level, in functions and under ``TYPE_CHECKING`` alike — form no
cycle, and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import repo_root

PACKAGE = repo_root() / "repo_exp"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """``repo_exp.x.y`` → its file, for every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (``from a import b`` counts ``a`` and, when ``a.b``
    is a module, ``a.b``)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, …, a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle_and_passes_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_function_level_and_relative_imports_are_seen(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from pkg import top\n")
    (pkg / "top.py").write_text("import pkg.sub\n")
    modules = module_names(pkg)
    graph = {n: imported_modules(n, p, set(modules)) for n, p in modules.items()}
    assert graph["pkg.sub"] == {"pkg.sub.leaf"} and graph["pkg.sub.leaf"] == {"pkg", "pkg.top"}
    assert find_cycle(graph) == ["pkg.sub", "pkg.sub.leaf", "pkg.top", "pkg.sub"]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_layers_import_downwards_only():
    """The set-up never imports the DeepSpeed plug-in, training or an entry point; the math imports nothing of the
    package above it."""
    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert not reach("repo_exp.setup") & {"repo_exp.deepspeed_engine", "repo_exp.train", "repo_exp.evaluate",
                                          "repo_exp.__main__"}
    assert "repo_exp.__main__" not in reach("repo_exp.evaluate")
    for low in ("repo_exp.algorithms", "repo_exp.constraints"):
        assert all(m.startswith(low) for m in reach(low)), reach(low)


def test_every_module_imports_in_a_fresh_interpreter():
    """Every module, imported by name in a new interpreter (none imported by the tests first)."""
    names = sorted(module_names())
    script = ("import importlib, sys, traceback\n"
              "failed = []\n"
              "for name in sys.argv[1:]:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except Exception:\n"
              "        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
              "print('\\n'.join(failed)); sys.exit(1 if failed else 0)\n")
    proc = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=300,
                          cwd=repo_root())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
