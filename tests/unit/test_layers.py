"""The package's layers (docs/architecture.md): every module imports only its own layer and
the layers below, and no import circle exists. Imports inside functions count too: a lazy import
is still a dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nspawn_runner"

# The order, written once: a module may import modules of its own rank or lower.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("nspawn_runner", "log"),
    ("errors",),
    ("proc", "layout", "schema", "table"),
    ("progress",),
    ("host",),
    ("settings",),
    ("images",),
    ("gitlab",),
    ("executor",),
    ("local",),
    ("check",),
    ("cli", "manual"),
    ("main", "__main__"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# What the `run` stage, called for every step of every job, may load.
RUN_HOT_PATH = {"nspawn_runner", "nspawn_runner.errors", "nspawn_runner.log",
                "nspawn_runner.proc", "nspawn_runner.layout", "nspawn_runner.executor",
                "nspawn_runner.executor.run", "nspawn_runner.executor.state",
                "nspawn_runner.executor.identity"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(path: Path) -> set[str]:
    """The nspawn_runner modules `path` imports (a `from pkg import name` counts as
    pkg.name when that is a module, else as pkg)."""
    tree = ast.parse(path.read_text())
    own = module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nspawn_runner")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join([*own.split(".")[:-node.level], node.module])
            if not base.startswith("nspawn_runner"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return found - {own}


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer() -> None:
    unknown = sorted(m for m in MODULES if layer_of(m) not in RANK)
    assert not unknown, f"modules outside the layers of {__file__}: {unknown}"


def violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
            for m, targets in sorted(graph.items()) for t in sorted(targets)
            if RANK[layer_of(t)] > RANK[layer_of(m)]]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in state and nxt in graph:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_no_import_from_a_higher_layer() -> None:
    wrong = violations(GRAPH)
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_no_import_circles() -> None:
    found = circles(GRAPH)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_catch_what_they_are_for() -> None:
    bad = {"nspawn_runner.host.fs": {"nspawn_runner.executor.state"},
           "nspawn_runner.executor.state": {"nspawn_runner.images.store"},
           "nspawn_runner.images.store": {"nspawn_runner.host.fs"}}
    assert violations(bad) == [
        "nspawn_runner.host.fs (host) imports nspawn_runner.executor.state (executor)"]
    assert circles(bad) == [["nspawn_runner.executor.state", "nspawn_runner.images.store",
                             "nspawn_runner.host.fs", "nspawn_runner.executor.state"]]


def test_the_run_stage_loads_only_its_hot_path() -> None:
    code = ("import sys; from nspawn_runner.executor import run; "
            "print(' '.join(m for m in sys.modules if m.startswith('nspawn_runner')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert set(out) <= RUN_HOT_PATH, f"run loads more than its hot path: {set(out) - RUN_HOT_PATH}"
