"""The package's layers (docs/architecture.md): every module imports only its own layer and
the layers below, and no import circle exists. Imports inside functions count too: a lazy import
is still a dependency."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nspawn_runner"

# The order, written once: a module may import modules of its own rank or lower.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("nspawn_runner", "log", "record", "runtime"),
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
                "nspawn_runner.record", "nspawn_runner.proc", "nspawn_runner.runtime",
                "nspawn_runner.executor", "nspawn_runner.executor.run",
                "nspawn_runner.executor.state",
                "nspawn_runner.executor.identity", "nspawn_runner.executor.status"}


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


# What each stage command may load, by its own dispatch in main.py (no typer): tests below run
# each stage for real against stand-in systemd commands and compare. A module added to a
# stage's path must be added here, knowingly.
_STAGE_BASE = {"nspawn_runner", "nspawn_runner.main", "nspawn_runner.errors", "nspawn_runner.log",
               "nspawn_runner.record", "nspawn_runner.proc", "nspawn_runner.runtime"}
_SETTINGS = {"nspawn_runner.settings", "nspawn_runner.schema", "nspawn_runner.table",
             "nspawn_runner.host", "nspawn_runner.host.limits", "nspawn_runner.host.backends",
             "nspawn_runner.host.fs", "nspawn_runner.host.netplan"}
STAGE_PATHS: dict[str, set[str]] = {
    "config": _STAGE_BASE | _SETTINGS | {"nspawn_runner.layout", "nspawn_runner.executor",
                                         "nspawn_runner.executor.config"},
    "prepare": _STAGE_BASE | _SETTINGS | {"nspawn_runner.layout",
        "nspawn_runner.executor", "nspawn_runner.executor.prepare",
        "nspawn_runner.executor.identity", "nspawn_runner.executor.state",
        "nspawn_runner.executor.status", "nspawn_runner.host.network",
        "nspawn_runner.executor.reap", "nspawn_runner.executor.pool",
        "nspawn_runner.host.machine", "nspawn_runner.host.machined", "nspawn_runner.images",
        "nspawn_runner.images.names", "nspawn_runner.images.spec"},
    "run": _STAGE_BASE | RUN_HOT_PATH,
    "cleanup": _STAGE_BASE | _SETTINGS | {"nspawn_runner.layout",
        "nspawn_runner.executor", "nspawn_runner.executor.cleanup",
        "nspawn_runner.executor.identity", "nspawn_runner.executor.state",
        "nspawn_runner.executor.reap", "nspawn_runner.host.machine",
        "nspawn_runner.host.machined"},
}
# Never on a stage's path: the CLI framework, the TOML writer, D-Bus bindings.
FORBIDDEN = ("typer", "click", "rich", "pydantic", "tomlkit", "gi", "pydbus")
# Standard-library modules `run` (and config's kept output) does without (measured,
# docs/performance.md): pathlib 3-5 ms, typing 4 ms,
# subprocess with threading and selectors 4 ms, dataclasses 5 ms, hashlib 2 ms.
RUN_FORBIDDEN = ("pathlib", "typing", "subprocess", "threading", "selectors", "contextlib",
                 "dataclasses", "hashlib", "tempfile", "shlex")
_STUB = """#!/bin/sh
# Stand-in for systemd tools: succeed; as systemd-run --machine, leave the step's status 0
# where the harness's stand-in machine root has it.
for a; do case $a in --machine=*) m=${a#--machine=};; esac; last=$a; done
if [ "$(basename "$0")" = systemd-run ] && [ -n "$m" ]; then
    r=$(dirname "$0")/../results  # the environment is the driver's own, not ours
    : > "$r/$(basename "$last").started"
    echo 0 > "$r/$(basename "$last").status"
fi
exit 0
"""
_HARNESS = textwrap.dedent("""
    import json, os, sys
    from nspawn_runner import main
    if sys.argv[1] == "prepare":
        # This machine may not run systemd; the stand-ins below play it, and this process
        # plays the machine's init.
        from nspawn_runner.executor import prepare, state, status
        prepare._check_host = lambda: None
        prepare.machine.describe = lambda m: (state.process_identity(os.getpid()), "")
        status.device = lambda leader: 1
    if sys.argv[1] == "run":
        from nspawn_runner.executor import status
        status.open_dir = lambda *a, **k: os.open(os.environ["RESULTS"], os.O_RDONLY)
    code = main.stage(sys.argv[1:])
    loaded = sorted(m for m in sys.modules
                    if m.startswith("nspawn_runner") or m.split(".")[0] in {forbidden}
                    or (sys.argv[1] == "run" and m.split(".")[0] in {run_forbidden})
                    or (os.environ.get("CACHED") and m.split(".")[0] in {run_forbidden}))
    with open(os.environ["LOADED"], "w") as f:
        json.dump({{"code": code, "modules": loaded}}, f)
""")


@pytest.fixture(scope="module")
def stage_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("stages")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for tool in ("systemd-run", "systemctl", "machinectl", "journalctl"):
        (bin_dir / tool).write_text(_STUB)
        (bin_dir / tool).chmod(0o755)
    image = tmp / "root" / "images" / "bookworm"
    (image / "sbin").mkdir(parents=True)
    (image / "sbin" / "init").symlink_to("/lib/systemd/systemd")
    (tmp / "config.toml").write_text(f'root = "{tmp / "root"}"\nbackend = "overlay"\n'
                                     f'images_config_dir = "{tmp / "images.d"}"\n'
                                     # The stand-ins play no network (test_network.py does).
                                     'network = "none"\n')
    (tmp / "response.json").write_text(json.dumps({"id": 77, "variables": []}))
    (tmp / "script").write_text("true\n")
    (tmp / "results").mkdir()
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "NSPAWN_RUNNER_CONFIG": str(tmp / "config.toml"),
            "NSPAWN_RUNNER_RUNTIME_DIR": str(tmp / "run"), "CUSTOM_ENV_CI_JOB_IMAGE": "bookworm",
            "JOB_RESPONSE_FILE": str(tmp / "response.json"), "SCRIPT": str(tmp / "script"),
            "LOADED": str(tmp / "loaded.json"), "RESULTS": str(tmp / "results")}


# A config call whose settings have not changed since the last one reads its kept output.
CONFIG_CACHED = _STAGE_BASE | {"nspawn_runner.executor", "nspawn_runner.executor.config"}


@pytest.mark.parametrize("stage", ["config", "config (cached)", "prepare", "run", "cleanup"])
def test_each_stage_loads_only_its_path(stage: str, stage_env: dict[str, str]) -> None:
    """In the order gitlab-runner calls them: run finds what prepare left."""
    if stage == "config (cached)":
        args = ["config"]
    else:
        args = [stage, stage_env["SCRIPT"], "build_script"] if stage == "run" else [stage]
    code = _HARNESS.format(forbidden=set(FORBIDDEN), run_forbidden=set(RUN_FORBIDDEN))
    cached = {"CACHED": "1"} if stage == "config (cached)" else {}
    subprocess.run([sys.executable, "-c", code, *args],
                   env={**os.environ, **stage_env, **cached}, check=True,
                   stdout=subprocess.DEVNULL)
    result = json.loads(Path(stage_env["LOADED"]).read_text())
    assert result["code"] == 0, f"{stage} did not run through, so its imports are not all seen"
    loaded = set(result["modules"])
    forbidden = sorted(m for m in loaded if m.split(".")[0] in (*FORBIDDEN, *RUN_FORBIDDEN))
    assert not forbidden, f"{stage} loads {forbidden}"
    grown = sorted(loaded - (CONFIG_CACHED if stage == "config (cached)" else STAGE_PATHS[stage]))
    assert not grown, f"{stage} loads more than its path: {grown}"
