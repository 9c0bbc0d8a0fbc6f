"""The package's architecture: every module imports on its own, the import graph has no cycles,
and the pure library (everything outside ``reg2d3d_ros/ros/``) never imports ROS at module level.

The import graph is read from the source with :mod:`ast`: every ``import`` and ``from ... import``
statement, at module level or inside functions and classes, relative imports resolved. An edge
``a -> b`` means module ``a`` imports module ``b``: ``import x.y`` is an edge to ``x.y``;
``from x import y`` is an edge to ``x.y`` when that is a module, and to ``x`` when ``y`` is a name
defined in ``x`` (``from . import objects`` in a subpackage only needs the submodule). The parent
packages that Python initialises on the way are not edges of their own unless they are imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "reg2d3d_ros"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
#: Top-level modules of ROS that the pure library must not import at module level.
ROS_MODULES = ("rclpy", "rosbag2_py", "rosidl_runtime_py", "launch", "launch_ros", "ament_index_python", "builtin_interfaces",
               "std_msgs", "sensor_msgs", "geometry_msgs", "diagnostic_msgs", "tf2_msgs", "tf2_ros", "lifecycle_msgs", "rcl_interfaces",
               "reg2d3d_interfaces")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict:
    """``{module name: path}`` of every module of the package."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path, name: str, module_level_only: bool = False, modules=()) -> list:
    """``[(imported module, line)]`` of one file (absolute names; relative imports resolved).

    ``modules``: the package's modules (``from x import y`` gives ``x.y`` alone when it is one of them).
    """
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # module level includes the bodies of top-level if/try blocks
        nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 for n in ast.walk(top)]
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names]
            out += [(m, node.lineno) for m in subs if m in modules]
            if any(m not in modules for m in subs):  # a name defined in the module (or package) itself
                out.append((mod, node.lineno))
    return out


def import_graph() -> dict:
    """``{module: {imported module of the package: line}}``."""
    mods = all_modules()
    graph = {}
    for name, path in mods.items():
        edges = {}
        for target, line in _imports(path, name, modules=mods):
            if target in mods and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """One cycle ``[a, b, ..., a]`` of the graph, or None."""
    state = {}  # 1: on the stack, 2: done
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 50, "the package's modules were not found"
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle:\n  " + "\n  ".join(steps))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None


def test_engines_depend_on_nothing_above_them():
    """``engines`` imports only itself and the package's leaves (errors), never a method."""
    allowed = {f"{PACKAGE}.errors", f"{PACKAGE}.engines", f"{PACKAGE}.engines.runtime"}
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith(f"{PACKAGE}.engines"):
            assert set(edges) <= allowed, f"{name} imports {sorted(set(edges) - allowed)}"


def test_the_library_never_imports_ros_at_module_level():
    bad = []
    for name, path in all_modules().items():
        if name.startswith(f"{PACKAGE}.ros"):
            continue
        for target, line in _imports(path, name, module_level_only=True):
            if target.split(".")[0] in ROS_MODULES:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_training_module_at_the_package_root():
    """Training commands live with their method (``<method>/train.py``), not at the root."""
    assert not sorted(p.name for p in ROOT.glob("train_*.py"))
    for method in ("scr", "ppcl", "ppcflow", "similarity"):
        assert (ROOT / method / "train.py").is_file(), method


def _rclpy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("rclpy") is not None


@pytest.mark.parametrize("name", sorted(all_modules()))
def test_every_module_imports_on_its_own(name):
    """Each module in a fresh interpreter: no hidden dependence on what another import did first."""
    if name.startswith(f"{PACKAGE}.ros") and not _rclpy_available():
        pytest.skip("rclpy is not available")
    r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300, cwd=ROOT.parent)
    assert r.returncode == 0, f"import {name} failed:\n{r.stderr[-3000:]}"
