"""The structure of the code, read from its imports (ast; imports inside functions count too).

Every import points down the layer table below (a file may import its own layer and those under it), no
files import each other round a loop, the engine and the Distiller know no task, a task's package knows no
other task, and no source file is longer than 600 lines. ``python tests/test_layout.py`` prints the table
with the import arrows of each layer.
"""
from __future__ import annotations

import ast
import gc
import os
import sys
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 600

# Bottom first. An entry ending in "/" holds a folder; the longest entry that holds a file places it.
LAYERS: List[Tuple[str, List[str]]] = [
    ("base", ["fastkd/__init__.py", "fastkd/errors.py", "fastkd/config_errors.py", "fastkd/config.py",
              "fastkd/comm.py", "fastkd/resources.py", "fastkd/_ext.py", "fastkd/testing.py", "fastkd/atomic.py"]),
    ("ops", ["fastkd/ops/"]),
    ("losses", ["fastkd/losses/"]),
    ("models", ["fastkd/models/"]),
    ("data", ["fastkd/data/"]),
    ("distill", ["fastkd/distill/"]),
    ("tasks", ["fastkd/tasks/"]),
    ("engine", ["fastkd/engine/"]),
    ("front", ["fastkd/cli.py", "fastkd/demos/"]),
    ("benchmarks", ["benchmarks/"]),
]
TASK_NEUTRAL = ("fastkd/tasks/__init__.py", "fastkd/tasks/base.py")  # the registry and the interface


def python_files() -> List[str]:
    out = []
    for top in ("fastkd", "benchmarks"):
        for folder, dirs, names in os.walk(os.path.join(REPO, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            out += [os.path.relpath(os.path.join(folder, n), REPO) for n in sorted(names) if n.endswith(".py")]
    return out


def module_name(path: str) -> str:
    name = path[:-3].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def parse(source: str, path: str) -> ast.AST:
    """ast.parse with the garbage collector paused: on Python 3.11, a finalizer that runs inside the AST's
    construction (numba's, left by earlier FFCV tests in the same process) can end it in "SystemError: AST
    constructor recursion depth mismatch" (the recursion-depth bookkeeping of CPython 3.11's AST objects)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, path)
    finally:
        if enabled:
            gc.enable()


class Graph:
    """Files and the files each one imports (``arrows[a]``: {b: [line numbers]})."""

    def __init__(self, files: List[str]):
        self.files = files
        self.by_module = {module_name(f): f for f in files}
        self.arrows: Dict[str, Dict[str, List[int]]] = {f: self._imports(f) for f in files}

    def _file(self, module: str, name: Optional[str] = None) -> Optional[str]:
        """The file ``from module import name`` loads: the submodule ``name`` if there is one, else ``module``."""
        if name is not None and f"{module}.{name}" in self.by_module:
            return self.by_module[f"{module}.{name}"]
        return self.by_module.get(module)

    def _imports(self, path: str) -> Dict[str, List[int]]:
        module = module_name(path)
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        with open(os.path.join(REPO, path)) as f:
            tree = parse(f.read(), path)
        out: Dict[str, List[int]] = {}
        for node in ast.walk(tree):
            targets: List[Optional[str]] = []
            if isinstance(node, ast.Import):
                targets = [self._file(self._local(a.name, path)) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = self._local(node.module or "", path)
                targets = [self._file(base, a.name) for a in node.names]
            for target in set(targets) - {None, path}:
                out.setdefault(target, []).append(node.lineno)
        return out

    def _local(self, module: str, path: str) -> str:
        """A benchmark script's ``import common`` (the script's folder is on its path) is benchmarks/common."""
        if path.startswith("benchmarks/") and f"benchmarks.{module}" in self.by_module:
            return f"benchmarks.{module}"
        return module

    def cycles(self) -> List[List[str]]:
        """Groups of files that import each other round a loop (Tarjan's strongly connected components)."""
        index: Dict[str, int] = {}
        low: Dict[str, int] = {}
        stack: List[str] = []
        on_stack: Set[str] = set()
        found: List[List[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in self.arrows[v]:
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
                    found.append(sorted(group))

        for v in self.files:
            if v not in index:
                visit(v)
        return found


def layer_of(path: str) -> Optional[int]:
    best, level = -1, None
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (path == entry or (entry.endswith("/") and path.startswith(entry))) and len(entry) > best:
                best, level = len(entry), i
    return level


def task_of(path: str) -> Optional[str]:
    """``detection`` for fastkd/tasks/detection/..., None for the task-neutral files of fastkd/tasks/."""
    parts = path.split("/")
    return parts[2] if len(parts) > 3 and parts[:2] == ["fastkd", "tasks"] else None


@pytest.fixture(scope="module")
def graph() -> Graph:
    return Graph(python_files())


def _where(graph: Graph, a: str, b: str) -> str:
    return f"{a}:{','.join(map(str, graph.arrows[a][b]))} -> {b}"


def test_every_file_has_a_layer(graph):
    assert [f for f in graph.files if layer_of(f) is None] == []


def test_imports_point_down_the_layers(graph):
    up = [f"{_where(graph, a, b)} ({LAYERS[layer_of(a)][0]} imports {LAYERS[layer_of(b)][0]})"
          for a in graph.files for b in graph.arrows[a] if layer_of(b) > layer_of(a)]
    assert up == []


def test_no_import_cycles(graph):
    loops = []
    for group in graph.cycles():
        ties = [_where(graph, a, b) for a in group for b in graph.arrows[a] if b in group]
        loops.append(f"{' <-> '.join(group)}: {'; '.join(ties)}")
    assert loops == []


def test_the_engine_and_the_distiller_know_no_task(graph):
    """They reach a task through the registry and the interface (fastkd.tasks, tasks/base.py) only."""
    bad = [_where(graph, a, b) for a in graph.files if a.startswith(("fastkd/engine/", "fastkd/distill/"))
           for b in graph.arrows[a] if b.startswith("fastkd/tasks/") and b not in TASK_NEUTRAL]
    assert bad == []


def test_a_task_knows_no_other_task(graph):
    bad = [_where(graph, a, b) for a in graph.files for b in graph.arrows[a]
           if task_of(a) and task_of(b) and task_of(a) != task_of(b)]
    assert bad == []


def test_no_source_file_is_longer_than_600_lines():
    long = []
    for top in ("fastkd", "benchmarks", "tests", "csrc"):
        for folder, dirs, names in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in names:
                if name.endswith((".py", ".cpp", ".h")):
                    with open(os.path.join(folder, name)) as f:
                        n = sum(1 for _ in f)
                    if n > MAX_LINES:
                        long.append(f"{os.path.relpath(os.path.join(folder, name), REPO)}: {n} lines")
    assert long == []


# -- data per task, the demos' package ----------------------------------------------------------------------

DATA_TASKS = ("classification", "detection", "segmentation")


def test_data_is_a_core_and_one_folder_per_task(graph):
    folders = {f.split("/")[2] for f in graph.files if f.startswith("fastkd/data/") and f.count("/") > 2}
    assert set(DATA_TASKS) <= folders, f"fastkd/data/ has folders {sorted(folders)}"
    bad = []
    for a in graph.files:
        if not a.startswith("fastkd/data/"):
            continue
        own = a.split("/")[2] if a.count("/") > 2 else None
        for b in graph.arrows[a]:
            other = b.split("/")[2] if b.startswith("fastkd/data/") and b.count("/") > 2 else None
            if other in DATA_TASKS and other != own:  # the core and the shared sources import no task's data
                bad.append(_where(graph, a, b))
    assert bad == []


def test_the_demos_are_one_package_that_only_the_cli_imports(graph):
    assert {f for f in graph.files if f.startswith("fastkd/demo")} == {
        f"fastkd/demos/{n}.py" for n in ("__init__", "common", "classification", "detection", "segmentation")}
    bad = [_where(graph, a, b) for a in graph.files for b in graph.arrows[a]
           if b.startswith("fastkd/demos/") and not a.startswith("fastkd/demos/") and a != "fastkd/cli.py"]
    bad += [_where(graph, a, b) for a in graph.files if a.startswith("fastkd/demos/") for b in graph.arrows[a]
            if b == "fastkd/cli.py"]
    assert bad == []


if __name__ == "__main__":
    g = Graph(python_files())
    arrows = [(a, b) for a in g.files for b in g.arrows[a]]
    print(f"{len(g.files)} files, {len(arrows)} import arrows (file to file), "
          f"{sum(layer_of(b) > layer_of(a) for a, b in arrows)} pointing up, {len(g.cycles())} cycles")
    for i, (name, entries) in reversed(list(enumerate(LAYERS))):
        files = [f for f in g.files if layer_of(f) == i]
        down = sum(1 for a, b in arrows if layer_of(a) == i and layer_of(b) < i)
        print(f"{i:2d} {name:<11} {len(files):3d} files, {down:3d} arrows to lower layers: {' '.join(entries)}")
    sys.exit(0)
