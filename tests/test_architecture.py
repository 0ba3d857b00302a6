"""The package's shape, checked: the import graph of ``src/fastfeed`` (every import, also inside
functions and under ``TYPE_CHECKING``) has no cycle; no module imports another module's
underscore names; modules stay small; ``import fastfeed`` loads neither the benchmark tools nor
the test helpers; and the import paths users know work without a warning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fastfeed

SRC = Path(fastfeed.__file__).resolve().parent
MAX_LINES = 600
#: Underscore modules meant to be shared inside the package.
SHARED_PRIVATE = {"_native", "_loop"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module ``name`` is or is in (``fastfeed.store.base.Store`` -> ``fastfeed.store.base``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str) -> list[tuple[str, str | None]]:
    """``(module imported, name imported from it or None)`` for every import in module ``name``."""
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "fastfeed"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "fastfeed":
            assert node.module is not None
            out += [(node.module, a.name) for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        deps = set()
        for module, attr in _imports(name):
            target = f"{module}.{attr}" if attr and f"{module}.{attr}" in MODULES else module
            owner = _owner(target)
            # A module's own package __init__ runs first anyway: not an edge.
            if owner and owner != name and not name.startswith(owner + "."):
                deps.add(owner)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checks_see_a_cycle_and_an_underscore_import() -> None:
    """The checks below would fail on a known bad graph (so a pass means something)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    graph = _graph()
    assert "fastfeed.order.streams" in MODULES and "fastfeed.order.plan" in graph["fastfeed.dataset"]


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_no_module_imports_another_modules_underscore_names() -> None:
    reach_ins = [
        f"{name} imports {module}.{attr}"
        for name in MODULES
        for module, attr in _imports(name)
        if attr is not None
        and attr.startswith("_")
        and not attr.startswith("__")
        and attr not in SHARED_PRIVATE
        and _owner(module) != name
    ]
    assert reach_ins == []


def test_modules_stay_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}, f"split modules over {MAX_LINES} lines"


def test_import_fastfeed_loads_no_tools() -> None:
    code = (
        "import sys, fastfeed\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('fastfeed.bench', 'fastfeed.testing')))\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "statement",
    [
        "from fastfeed import StreamingDataset, DataLoader, Checkpointer, CheckpointCallback, S3Config",
        "from fastfeed import FastfeedStorageReader, FastfeedStorageWriter",
        "import fastfeed.shards",
        "import fastfeed.decode; fastfeed.decode.Decoder",
        "import fastfeed.testing",
        "import fastfeed.lightning",
        "import fastfeed.cli",
    ],
)
def test_public_import_paths_work_without_a_warning(statement: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", statement], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr
