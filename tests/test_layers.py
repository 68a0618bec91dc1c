"""The layering of the packages: ``students`` <- ``teachers`` <- distill core <- distill tools <- ``distill/cli``.

The import graph is read statically (``ast``) from every module of the three packages, imports inside functions
included: a lazy import still makes one module depend on the other, and a cycle of lazy imports is a cycle of
responsibilities even when the interpreter happens to survive it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("students", "teachers", "distill")
# distill's core: what training needs. It may not reach up into the tools or the command line.
CORE = ("distill.config", "distill.yamlconf", "distill.data", "distill.dsi", "distill.gam", "distill.engine",
        "distill.evaluator", "distill.ema", "distill.optim", "distill.schedule", "distill.rundir")  # fmt: skip
TOOLS = ("distill.grid", "distill.viz", "distill.onnx_export", "distill.detect", "distill.bench", "distill.compare",
         "distill.parity")  # fmt: skip


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the three packages (a package is its ``__init__.py``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except under ``if TYPE_CHECKING:`` (never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _imports_of(child))
            continue
        yield from _imports_of(node)


def _imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that ``name`` (a module or an attribute of one) belongs to, or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> project modules it imports, module -> every top-level name it imports, e.g. 'argparse')."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    external: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                owner = _owner(target, modules)
                if owner is not None and owner != module:
                    graph[module].add(owner)
                external[module].add(target)
    return graph, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path a -> ... -> a) for each strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path_back(sorted(c)[0], set(c), graph) for c in components]


def _path_back(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


MODULES = project_modules()
GRAPH, EXTERNAL = import_graph(MODULES)


def _violations(source: tuple[str, ...], forbidden: tuple[str, ...], exempt: tuple[str, ...] = ()) -> list[str]:
    return sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if _within(m, source) and not
                  _within(m, exempt) for t in targets if _within(t, forbidden))  # fmt: skip


def test_the_graph_sees_every_module_and_resolves_relative_imports():
    assert {"students", "teachers", "distill", "distill.cli", "distill.data.config"} <= set(MODULES)
    assert "students.registry" in GRAPH["students"]  # `from .registry import ...` in students/__init__.py
    assert "distill.cli" in GRAPH["distill.cli.__main__"]


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_cycle_finder_names_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_students_import_nothing_of_teachers_or_distill():
    assert _violations(("students",), ("teachers", "distill")) == []


def test_teachers_import_nothing_of_distill():
    assert _violations(("teachers",), ("distill",)) == []


def test_distill_core_imports_no_tool_and_no_command():
    assert _violations(CORE, (*TOOLS, "distill.cli")) == []


def test_data_depends_on_no_other_part_of_the_core():
    # the training config embeds the data config, not the other way round; evaluation sits beside the data
    others = ("distill.config", "distill.evaluator", "distill.engine", "distill.dsi", "distill.gam", "distill.optim",
              "distill.schedule", "distill.ema")  # fmt: skip
    assert _violations(("distill.data",), others) == []


def test_the_error_classes_are_a_leaf_every_layer_can_import():
    assert GRAPH["students.errors"] == set() and EXTERNAL["students.errors"] <= {"__future__"}
    assert GRAPH["distill.errors"] == {"students.errors"}


def test_only_the_command_line_parses_arguments_or_imports_the_command_line():
    offenders = sorted(m for m, names in EXTERNAL.items() if not _within(m, ("distill.cli",))
                       and any(n == "argparse" or n.startswith("argparse.") for n in names))  # fmt: skip
    assert offenders == [], f"argparse outside distill/cli: {offenders}"
    assert _violations(PACKAGES, ("distill.cli",), exempt=("distill.cli",)) == []


def test_importing_students_and_teachers_loads_no_distill_module():
    # a fresh interpreter: this test process has imported distill long ago
    code = (
        "import pkgutil, importlib, sys\n"
        "import students, teachers\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'distill'], 'plain import'\n"
        "for pkg in (students, teachers):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'distill')\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
