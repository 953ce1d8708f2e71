"""The benchmark's basics: the variants measured (driver x backend), the runner
configurations and settings they use, and the check that jobs left nothing behind."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gitlab_emulator import Job, JobResult, RunnerConfig, run_job

HERE = Path(__file__).resolve().parent
# The test bed's two state roots (tests/testbed.py), each with the guest image.
ROOTS = {"btrfs": Path("/srv/btrfs/nspawn-runner"), "overlay": Path("/var/lib/nspawn-runner")}
IMAGE = "bookworm"
NR = "nspawn-runner"
SHELL_DRIVER = HERE / "shell-driver"
SHELL = "shell"
OURS = "nspawn-runner"
POOLED = "nspawn-runner+pool"


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Variant:
    driver: str  # SHELL, OURS or POOLED
    backend: str  # a key of ROOTS

    @property
    def name(self) -> str:
        return f"{self.driver}/{self.backend}"

    @property
    def root(self) -> Path:
        return ROOTS[self.backend]


def rotated(items: Sequence[Variant], shift: int) -> list[Variant]:
    """Round `shift`'s order: each variant runs first in turn, so that drift and what ran just
    before hit all of them alike."""
    k = shift % len(items)
    return [*items[k:], *items[:k]]


class Bench:
    """What every part needs: settings files, runner configurations, job ids."""

    def __init__(self, workdir: Path, pool_size: int) -> None:
        self.workdir = workdir
        self.pool_size = pool_size
        # Ids unique across runs, so that a leftover of an earlier run is never taken for ours.
        self._ids = itertools.count(int(time.time()) % 10**7 * 1000)

    def settings(self, backend: str, pool_size: int = 0) -> Path:
        """nspawn-runner's settings: the defaults but for the state root (and the pool)."""
        path = self.workdir / f"config-{backend}-{pool_size}.toml"
        if not path.exists():
            text = f'root = "{ROOTS[backend]}"\n'
            text += f"pool_size = {pool_size}\n" if pool_size else ""
            path.write_text(text)
        return path

    def runner_config(self, v: Variant, exe: Sequence[str] = (NR,)) -> RunnerConfig:
        """gitlab-runner's [runners.custom] for the variant; `exe` runs nspawn-runner
        (python -X importtime SCRIPT, say)."""
        if v.driver == SHELL:
            sd = os.fspath(SHELL_DRIVER)
            return RunnerConfig(
                config_exec=[f"{sd}/config"], prepare_exec=[f"{sd}/prepare"],
                run_exec=[f"{sd}/run"], cleanup_exec=[f"{sd}/cleanup"],
                graceful_kill_timeout=30, force_kill_timeout=10, retry_delay=0.2,
                extra_process_env={"SHELL_DRIVER_ROOT": os.fspath(v.root),
                                   "SHELL_DRIVER_BACKEND": v.backend,
                                   "SHELL_DRIVER_IMAGE": IMAGE})
        pool = self.pool_size if v.driver == POOLED else 0
        return RunnerConfig(
            config_exec=[*exe, "config"], prepare_exec=[*exe, "prepare"],
            run_exec=[*exe, "run"], cleanup_exec=[*exe, "cleanup"],
            graceful_kill_timeout=30, force_kill_timeout=10, retry_delay=0.2,
            extra_process_env={"NSPAWN_RUNNER_CONFIG": os.fspath(self.settings(v.backend,
                                                                               pool))})

    def job(self, script: Sequence[str] = ("echo hello",), **kw: Any) -> Job:
        """The trivial job: prepare_script, get_sources, build_script, step_second,
        after_script and cleanup_file_variables: 6 run stages."""
        kw.setdefault("extra_steps", {"second": ["echo second"]})
        kw.setdefault("after_script", ["echo after"])
        return Job(script=list(script), job_id=next(self._ids), image=IMAGE, **kw)

    def run(self, v: Variant, job: Job, exe: Sequence[str] = (NR,),
            live: Callable[[str], None] | None = None) -> JobResult:
        result = run_job(self.runner_config(v, exe), job, live_output=live, timeout=600)
        if result.status != "success":
            raise BenchError(f"{v.name}: job {job.job_id} {result.status}: {result.error}\n"
                             + result.plain_log[-3000:] + result.runner_log[-2000:])
        return result


def sh(*cmd: str, check: bool = True) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def leftovers() -> list[str]:
    """What a job of either driver may leave: machines, units, writable layers, snapshots,
    state files, mounts."""
    found = [f"machine: {line.split()[0]}"
             for line in sh("machinectl", "list", "--no-legend").splitlines()
             if line.startswith(("nr-", "sd-"))]
    units = sh("systemctl", "list-units", "--all", "--no-legend", "--plain",
               "nspawn-runner-*", "shell-driver-*").splitlines()
    found += [f"unit: {u.split()[0]}" for u in units if u.strip()]
    for root in ROOTS.values():
        for layers in (root / "overlays", root / "shell-overlays"):
            if layers.is_dir():
                found += [f"writable layer: {p}" for p in layers.iterdir()]
        # nspawn's lock files (.#NAME.lck) are harmless and may be held by another nspawn.
        found += [f"snapshot: {p}" for p in (root / "images").glob(".#*") if p.suffix != ".lck"]
    run_dir = Path("/run/nspawn-runner")
    if run_dir.is_dir():
        found += [f"state: {p}" for p in run_dir.iterdir()]
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    found += [f"mount: {m.split()[4]}" for m in mounts
              if "/overlays/" in m or " /run/nspawn-runner" in m]
    return found


def wait_clean(timeout: float) -> tuple[list[str], float]:
    """Leftovers once they are gone or `timeout` passed, and how long that took (a driver may
    finish removing after cleanup returned)."""
    start = time.monotonic()
    while True:
        found = leftovers()
        waited = time.monotonic() - start
        if not found or waited > timeout:
            return found, waited
        time.sleep(0.2)


def interpreter() -> str:
    """The Python that runs nspawn-runner (its script's #! line)."""
    script = shutil.which(NR)
    if script is None:
        raise BenchError(f"{NR} is not on PATH: run this inside the test bed (bench/run)")
    first = Path(script).read_bytes().split(b"\n", 1)[0]
    return first[2:].decode().strip() if first.startswith(b"#!") else sys.executable
