#!/usr/bin/env python3
"""The speed benchmark of issue 10: nspawn-runner against a minimal hand-written shell driver
(bench/shell-driver), measured in one run, interleaved, medians after a warm-up.

Runs inside the test bed, where systemd is real; `bench/run` on the machine boots the bed, runs
this and copies the JSON out. Inside the bed:

    /opt/nspawn-runner/bin/python /src/bench/run.py --json FILE [--rounds 9] [--only PARTS]

Parts (--only, comma-separated; all by default):
  lifecycle      whole trivial jobs (config, prepare, 6 run stages, cleanup) through the
                 gitlab-runner emulator (tests/gitlab_emulator.py) for both drivers on btrfs and
                 on overlay, and the ratios; with the warm pool too once `nspawn-runner
                 settings --json` knows pool_size
  stages         each stage call of those jobs, and the CLI's start-up: `nspawn-runner
                 --version` (--help while it has none), a no-op run stage of both drivers, bare
                 `systemd-run --machine` and `python -c pass` as the floors
  first-command  time from the start of prepare to the job's first command running inside
  concurrent     8 jobs at once on one image: jobs per minute, disk per job, all succeed,
                 nothing left behind (both drivers, both backends)
  images         `nspawn-runner chroot-create` of the default image, cold and with a warm
                 package cache (from --mirror-dir, a local mirror bench/run provides)
  imports        `python -X importtime` of every stage command of a job, per package

lifecycle, stages and first-command come from the same jobs. Stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from gitlab_emulator import Job, JobResult, JobRun, RunnerConfig, job_payload, run_job
from mirror import ARCHIVE, IMAGE_PACKAGES, SUITE
from report import Stats, Target

HERE = Path(__file__).resolve().parent
PARTS = ("lifecycle", "stages", "first-command", "concurrent", "images", "imports")
JOB_PARTS = {"lifecycle", "stages", "first-command"}
# The test bed's two state roots (tests/testbed.py), each with the guest image.
ROOTS = {"btrfs": Path("/srv/btrfs/nspawn-runner"), "overlay": Path("/var/lib/nspawn-runner")}
IMAGE = "bookworm"
NR = "nspawn-runner"
SHELL_DRIVER = HERE / "shell-driver"
SHELL = "shell"
OURS = "nspawn-runner"
POOLED = "nspawn-runner+pool"
# Image builds get their own state root on the bed's btrfs, removed afterwards.
IMAGES_ROOT = Path("/srv/btrfs/bench-images")
STAGE_KEYS = ("config", "prepare", "run", "cleanup")


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


# --------------------------------------------------------------------------------------------
# (1)-(3) whole jobs, their stage calls, the first command
# --------------------------------------------------------------------------------------------


class FirstCommand:
    """Notes when the job log shows the output of the job's first command: prepare_script's
    `echo "Running on $(hostname)..."`."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, line: str) -> None:
        if self.at is None and line.startswith("Running on "):
            self.at = time.monotonic()


Samples = dict[str, list[float]]


def job_samples(v: Variant, result: JobResult, first: FirstCommand) -> dict[str, list[float]]:
    kinds = [c.kind for c in result.calls]
    want = ["config", "prepare", *["run"] * 6, "cleanup"]
    if kinds != want:
        raise BenchError(f"{v.name}: a job made the calls {kinds}, not {want}: a retry?\n"
                         f"{result.runner_log[-2000:]}")
    out: dict[str, list[float]] = {"job": [result.duration]}
    for key in STAGE_KEYS:
        out[key] = [c.duration for c in result.calls if c.kind == key]
    prepare = result.calls[1]
    if first.at is None:
        raise BenchError(f"{v.name}: the job log has no 'Running on' line")
    out["first_command"] = [first.at - prepare.started]
    return out


def lifecycle(bench: Bench, variants: Sequence[Variant], rounds: int,
              warmup: int) -> dict[str, Samples]:
    samples: dict[str, Samples] = {v.name: {} for v in variants}
    for r in range(warmup + rounds):
        line = []
        for v in rotated(variants, r):
            first = FirstCommand()
            result = bench.run(v, bench.job(), live=first)
            line.append(f"{v.name} {result.duration:.2f}s")
            if r < warmup:
                continue
            for key, values in job_samples(v, result, first).items():
                samples[v.name].setdefault(key, []).extend(values)
        label = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
        log(f"lifecycle {label}: " + ", ".join(line))
    return samples


class Session:
    """One job's stages called directly, with the environment gitlab-runner gives them, so
    that single calls can be timed on a machine that stays up."""

    def __init__(self, bench: Bench, v: Variant) -> None:
        self.v = v
        self.config = bench.runner_config(v)
        self.job = bench.job()
        self.tmp = Path(tempfile.mkdtemp(prefix="custom-executor"))
        payload = job_payload(self.config, self.job)
        response = self.tmp / "response.json"
        response.write_text(json.dumps(payload))
        response.chmod(0o600)
        variables = payload["variables"]
        assert isinstance(variables, list)
        self.env = {
            **os.environ, **self.config.extra_process_env,
            "TMPDIR": os.fspath(self.tmp),
            "BUILD_FAILURE_EXIT_CODE": "1",
            "SYSTEM_FAILURE_EXIT_CODE": "2",
            "BUILD_EXIT_CODE_FILE": os.fspath(self.tmp / "build_exit_code"),
            "JOB_RESPONSE_FILE": os.fspath(response),
            **{f"CUSTOM_ENV_{v['key']}": str(v["value"]) for v in variables},
            "CUSTOM_ENV_CI_JOB_IMAGE": IMAGE,
        }

    def call(self, argv: Sequence[str], stdin: Path | None = None) -> float:
        with open(stdin or os.devnull, "rb") as f:
            start = time.perf_counter()
            result = subprocess.run(argv, stdin=f, env=self.env, cwd=self.tmp,
                                    capture_output=True)
            took = time.perf_counter() - start
        if result.returncode != 0:
            raise BenchError(f"{self.v.name}: {' '.join(argv)} exited {result.returncode}: "
                             f"{result.stderr.decode(errors='replace')[-2000:]}")
        return took

    def __enter__(self) -> Session:
        assert self.config.config_exec and self.config.prepare_exec
        self.call(self.config.config_exec)
        try:
            self.call(self.config.prepare_exec)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.config.cleanup_exec
        try:
            self.call(self.config.cleanup_exec)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def cli_version_command() -> tuple[str, list[str]]:
    """`nspawn-runner --version` if it has one; the typer CLI's --help until then."""
    result = subprocess.run([NR, "--version"], capture_output=True)
    if result.returncode == 0:
        return f"{NR} --version", [NR, "--version"]
    return f"{NR} --help (no --version yet)", [NR, "--help"]


def startup(bench: Bench, rounds: int, backend: str) -> dict[str, Stats]:
    noop = bench.workdir / "noop-script"
    noop.write_text("#!/usr/bin/env bash\n:\n")
    label, version = cli_version_command()
    shell, ours = Variant(SHELL, backend), Variant(OURS, backend)
    with Session(bench, shell) as sd, Session(bench, ours) as nr:
        machine = f"sd-{sd.job.job_id}"
        commands: dict[str, tuple[Session, list[str], Path | None]] = {
            "python -c pass": (nr, [interpreter(), "-c", "pass"], None),
            label: (nr, version, None),
            f"{OURS} run (no-op script)": (nr, [NR, "run", os.fspath(noop), "build_script"],
                                           None),
            "shell driver run (no-op script)": (sd, [f"{SHELL_DRIVER}/run", os.fspath(noop),
                                                     "build_script"], None),
            "systemd-run --machine (bare)": (sd, ["systemd-run", "--quiet", "--pipe", "--wait",
                                                  f"--machine={machine}", "/bin/bash"], noop),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for r in range(rounds + 1):
            for name, (session, argv, stdin) in commands.items():
                took = session.call(argv, stdin)
                if r:  # the first round warms the page cache
                    times[name].append(took)
    log(f"start-up: {rounds} rounds done")
    return {name: report.summary(values) for name, values in times.items()}


def interpreter() -> str:
    """The Python that runs nspawn-runner (its script's #! line)."""
    script = shutil.which(NR)
    if script is None:
        raise BenchError(f"{NR} is not on PATH: run this inside the test bed (bench/run)")
    first = Path(script).read_bytes().split(b"\n", 1)[0]
    return first[2:].decode().strip() if first.startswith(b"#!") else sys.executable


def pool_supported(bench: Bench) -> bool:
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": os.fspath(bench.settings("btrfs"))}
    out = subprocess.run([NR, "settings", "--json"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"{NR} settings --json failed: {out.stderr}")
    settings: dict[str, object] = json.loads(out.stdout).get("settings", {})
    return "pool_size" in settings


def drain_pool(bench: Bench, backends: Sequence[str]) -> None:
    """Stop the pool's machines: its settings with pool_size 0, then gc."""
    for backend in backends:
        path = bench.settings(backend, bench.pool_size)
        path.write_text(f'root = "{ROOTS[backend]}"\npool_size = 0\n')
        subprocess.run([NR, "gc"], env={**os.environ, "NSPAWN_RUNNER_CONFIG": os.fspath(path)},
                       check=False)


# --------------------------------------------------------------------------------------------
# (4) concurrent jobs
# --------------------------------------------------------------------------------------------


def used_bytes(v: Variant) -> int:
    """Disk in use by jobs. btrfs: the file system's used blocks after a commit (its snapshots
    share extents, so du would count the whole image); overlay: the upper directories (the
    ext4 root is shared with the rest of the machine)."""
    if v.backend == "btrfs":
        # Deleted snapshots are freed in the background: wait for that, then commit.
        sh("btrfs", "subvolume", "sync", os.fspath(v.root))
        sh("sync", "-f", os.fspath(v.root))
        st = os.statvfs(v.root)
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    total = 0
    for layers in (v.root / "overlays", v.root / "shell-overlays"):
        for dirpath, _, files in os.walk(layers):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def machine_of(v: Variant, job: Job) -> str:
    if v.driver == SHELL:
        return f"sd-{job.job_id}"
    for line in sh("machinectl", "list", "--no-legend").splitlines():
        if line.startswith(f"nr-{job.job_id}-"):
            return line.split()[0]
    raise BenchError(f"{v.name}: no machine for job {job.job_id}")


def batch(bench: Bench, v: Variant, n: int) -> dict[str, Any]:
    runs = [JobRun(bench.runner_config(v), bench.job()) for _ in range(n)]
    start = time.monotonic()
    for run in runs:
        run.start()
    results = [run.wait(900) for run in runs]
    wall = time.monotonic() - start
    failed = [f"{r.calls[0].tempdir if r.calls else '?'}: {r.status} {r.error}"
              for r in results if r.status != "success"]
    left, waited = wait_clean(30)
    return {"wall": wall, "jobs_per_minute": n * 60 / wall, "failed": failed,
            "left_behind": left, "clean_after": waited}


def disk_peak(bench: Bench, v: Variant, n: int) -> float:
    """Disk per job while `n` jobs are up at once: each job waits in its build_script until
    every one of them is there, then the disk use is taken and they are released."""
    ready = threading.Semaphore(0)

    def live(line: str) -> None:
        if line.strip() == "bench-ready":
            ready.release()

    before = used_bytes(v)
    wait = ("for i in $(seq 1 3000); do [ -e /run/bench-go ] && exit 0; sleep 0.1; done; "
            "exit 1")
    jobs = [bench.job(["echo bench-ready", wait]) for _ in range(n)]
    runs = [JobRun(bench.runner_config(v), job, live_output=live) for job in jobs]
    for run in runs:
        run.start()
    try:
        for _ in range(n):
            if not ready.acquire(timeout=300):
                raise BenchError(f"{v.name}: not all {n} jobs came up within 300 s")
        peak = used_bytes(v)
    finally:
        for job in jobs:
            with contextlib.suppress(BenchError):
                sh("systemd-run", "--quiet", f"--machine={machine_of(v, job)}", "--wait",
                   "/bin/touch", "/run/bench-go", check=False)
        results = [run.wait(900) for run in runs]
    bad = [r.status for r in results if r.status != "success"]
    if bad:
        raise BenchError(f"{v.name}: disk batch: {len(bad)} jobs did not succeed")
    return (peak - before) / n


def concurrent(bench: Bench, variants: Sequence[Variant], n: int,
               rounds: int) -> dict[str, dict[str, Any]]:
    batches: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in rotated(variants, r):
            b = batch(bench, v, n)
            batches[v.name].append(b)
            log(f"concurrent round {r + 1}/{rounds}: {v.name}: {n} jobs in {b['wall']:.1f}s"
                f"{', FAILED ' + str(b['failed']) if b['failed'] else ''}"
                f"{', LEFT ' + str(b['left_behind']) if b['left_behind'] else ''}")
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        bs = batches[v.name]
        disk = disk_peak(bench, v, n)
        log(f"concurrent: {v.name}: {disk / 1e6:.1f} MB per job")
        out[v.name] = {
            "jobs": n, "rounds": rounds,
            "wall": report.summary([b["wall"] for b in bs]),
            "jobs_per_minute": report.summary([b["jobs_per_minute"] for b in bs]),
            "all_succeeded": not any(b["failed"] for b in bs),
            "failed": [f for b in bs for f in b["failed"]],
            "left_behind": [item for b in bs for item in b["left_behind"]],
            "clean_after_max": max(b["clean_after"] for b in bs),
            "disk_per_job_bytes": disk,
            "disk_method": "btrfs used blocks after sync -f" if v.backend == "btrfs"
            else "du of the upper directories",
        }
    return out


# --------------------------------------------------------------------------------------------
# (5) image creation
# --------------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """The local mirror on this host's loopback: its URL."""
    if not (directory / ARCHIVE / "dists" / SUITE / "InRelease").is_file():
        raise BenchError(f"{directory} is no mirror made by bench/mirror.py (no "
                         f"{ARCHIVE}/dists/{SUITE}/InRelease)")
    handler = functools.partial(QuietHandler, directory=os.fspath(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{ARCHIVE}"
    finally:
        server.shutdown()
        server.server_close()


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_tree(root: Path) -> None:
    """`root` and the btrfs subvolumes in it (image versions left aside, say)."""
    images_dir = root / "images"
    if images_dir.is_dir():
        for path in images_dir.iterdir():
            # The root directory of a btrfs subvolume has inode 256.
            if path.is_dir() and not path.is_symlink() and path.stat().st_ino == 256:
                sh("btrfs", "-q", "subvolume", "delete", os.fspath(path), check=False)
    shutil.rmtree(root, ignore_errors=True)


def images(rounds: int, mirror: str | None) -> dict[str, Any]:
    """chroot-create of the default image (minbase and what every image gets) with an empty
    package cache, then with the one the cold build left, interleaved."""
    root = IMAGES_ROOT
    remove_tree(root)
    files, cache = root / "images.d", root / "package-cache"
    files.mkdir(parents=True)
    settings = root / "config.toml"
    settings.write_text(f'root = "{root}"\nimages_config_dir = "{files}"\n'
                        f'package_cache = "{cache}"\n')
    spec = ('bootstrap = "mmdebstrap"\nsuite = "bookworm"\nvariant = "minbase"\n'
            f"packages = {json.dumps(list(IMAGE_PACKAGES))}\n")
    spec += f'mirror = "{mirror}"\n' if mirror else ""
    (files / "bench.toml").write_text(spec)
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": os.fspath(settings)}

    def build() -> float:
        start = time.perf_counter()
        result = subprocess.run([NR, "chroot-create", "bench"], env=env, capture_output=True,
                                text=True, timeout=1800)
        took = time.perf_counter() - start
        if result.returncode != 0:
            raise BenchError(f"chroot-create failed ({result.returncode}):\n"
                             f"{result.stdout[-2000:]}{result.stderr[-3000:]}")
        return took

    cold: list[float] = []
    warm: list[float] = []
    downloaded = 0
    try:
        for r in range(rounds):
            shutil.rmtree(cache, ignore_errors=True)
            cold.append(build())
            downloaded = tree_bytes(cache)
            warm.append(build())
            log(f"images round {r + 1}/{rounds}: cold {cold[-1]:.1f}s, warm {warm[-1]:.1f}s")
        size = int(sh("du", "-sb", os.fspath(root / "images" / "bench")).split()[0])
    finally:
        if (root / "images" / "bench").exists():
            subprocess.run([NR, "chroot-remove", "bench"], env=env, capture_output=True)
        remove_tree(root)
    return {"cold": report.summary(cold), "warm": report.summary(warm),
            "package_cache_bytes": downloaded, "image_bytes": size,
            "mirror": mirror or "the bed's own apt mirror (network)",
            "packages": list(IMAGE_PACKAGES)}


# --------------------------------------------------------------------------------------------
# imports
# --------------------------------------------------------------------------------------------


def imports(bench: Bench, rounds: int) -> dict[str, Any]:
    """Every stage command of a job under `python -X importtime`: the import time per stage
    and per package (medians over the calls). importtime itself adds some overhead."""
    python, script = interpreter(), shutil.which(NR)
    assert script is not None
    v = Variant(OURS, "btrfs")
    summaries: dict[str, list[report.ImportSummary]] = {}
    for _ in range(rounds):
        result = bench.run(v, bench.job(), exe=[python, "-X", "importtime", script])
        for call in result.calls:
            roots = report.parse_importtime(call.output_text)
            summaries.setdefault(call.kind, []).append(report.import_summary(roots))
    out: dict[str, Any] = {}
    for kind, found in summaries.items():
        ms: dict[str, list[float]] = {}
        via: dict[str, str] = {}
        for s in found:
            for p in s.packages:
                ms.setdefault(p.package, []).append(p.ms)
                via.setdefault(p.package, p.imported_by)
        # A package missing from a call took 0 ms there.
        packages = [report.PackageTime(name, report.summary(
                        values + [0.0] * (len(found) - len(values)))["median"], via[name])
                    for name, values in ms.items()]
        packages.sort(key=lambda p: -p.ms)
        out[kind] = {"calls": len(found),
                     "total_ms": report.summary([s.total_ms for s in found]),
                     "packages": [asdict(p) for p in packages]}
    log(f"imports: {rounds} jobs under -X importtime done")
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def stats_of(samples: dict[str, Samples]) -> dict[str, dict[str, Stats]]:
    return {name: {key: report.summary(vals) for key, vals in s.items()}
            for name, s in samples.items()}


def targets(results: dict[str, Any], backend: str) -> list[Target]:
    out: list[Target] = []
    life = results.get("lifecycle", {})
    shell, ours = life.get(f"{SHELL}/{backend}"), life.get(f"{OURS}/{backend}")
    if shell and ours:
        out += report.stage_targets(ours, shell)
        pooled = life.get(f"{POOLED}/{backend}")
        out.append(report.pool_target(pooled["job"]["median"] if pooled else None,
                                      shell["job"]["median"]))
    conc = results.get("concurrent", {})
    cs, co = conc.get(f"{SHELL}/{backend}"), conc.get(f"{OURS}/{backend}")
    if cs and co:
        out.append(report.concurrency_target(
            co["jobs_per_minute"]["median"], cs["jobs_per_minute"]["median"],
            co["all_succeeded"], not co["left_behind"], co["jobs"]))
    if "images" in results and backend == "btrfs":
        out.append(report.image_target(results["images"]["warm"]["median"]))
    return out


def render(results: dict[str, Any], backends: Sequence[str], markdown: bool = False) -> str:
    """The tables, as plain text or as Markdown (for docs/performance.md)."""
    f, x = report.seconds, report.times
    parts: list[str] = []

    def section(title: str, headers: Sequence[str], rows: list[list[str]],
                left: Sequence[int] = (0,)) -> str:
        if markdown:
            return f"**{title}**\n\n" + report.markdown_table(headers, rows)
        return f"{title}\n" + report.table(headers, rows, left)

    meta = results["meta"]
    parts.append(f"nspawn-runner benchmark, {meta['date']} ({meta['label']}), systemd "
                 f"{meta['systemd']}, {meta['cpus']} CPUs, load average {meta['load_before']} "
                 f"before, {meta.get('load_after', '?')} after")
    life = results.get("lifecycle")
    if life:
        pooled = any(k.startswith(POOLED) for k in life)
        head = ["whole job", "shell", OURS, "ratio", *(["pool", "ratio"] if pooled else [])]
        rows = []
        for b in backends:
            s, o, p = life[f"{SHELL}/{b}"], life[f"{OURS}/{b}"], life.get(f"{POOLED}/{b}")
            row = [b, f(s["job"]["median"]), f(o["job"]["median"]),
                   x(report.ratio(o["job"]["median"], s["job"]["median"]))]
            if pooled:
                row += [f(p["job"]["median"]) if p else "-",
                        x(report.ratio(p["job"]["median"], s["job"]["median"])) if p else "-"]
            rows.append(row)
        n = int(next(iter(life.values()))["job"]["n"])
        parts.append(section(f"Whole trivial job, config + prepare + 6 run stages + cleanup "
                             f"(median of {n} after {meta['warmup']} warm-up)", head, rows))
    if life and ("stages" in results["parts"] or "first-command" in results["parts"]):
        keys = [k for k in (*STAGE_KEYS, "first_command")
                if (k != "first_command" or "first-command" in results["parts"])
                and (k == "first_command" or "stages" in results["parts"])]
        head = ["per call"]
        for b in backends:
            head += [f"shell/{b}", f"{OURS}/{b}", "diff"]
        rows = []
        for key in keys:
            row = ["run (each)" if key == "run" else key.replace("_", " ")]
            for b in backends:
                s, o = life[f"{SHELL}/{b}"][key]["median"], life[f"{OURS}/{b}"][key]["median"]
                row += [f(s), f(o), f"{(o - s) * 1000:+.0f} ms"]
            rows.append(row)
        parts.append(section("Stage calls and the first command (medians; first command = "
                             "prepare's start to the first line of output from inside)",
                             head, rows))
    start = results.get("startup")
    if start:
        rows = [[name, f(s["median"]), f(s["min"]), f(s["max"])] for name, s in start.items()]
        parts.append(section(f"CLI start-up on {results['startup_backend']} (median of "
                             f"{int(next(iter(start.values()))['n'])})",
                             ["command", "median", "min", "max"], rows))
    conc = results.get("concurrent")
    if conc:
        rows = []
        for name, c in conc.items():
            rows.append([name, f"{c['jobs_per_minute']['median']:.0f}", f(c["wall"]["median"]),
                         f"{c['disk_per_job_bytes'] / 1e6:.1f} MB",
                         "yes" if c["all_succeeded"] else "NO",
                         str(len(c["left_behind"])), f(c["clean_after_max"])])
        c0 = next(iter(conc.values()))
        parts.append(section(f"{c0['jobs']} concurrent jobs on one image (median of "
                             f"{c0['rounds']} batches)",
                             ["variant", "jobs/min", "wall", "disk/job", "all ok", "left",
                              "clean after"], rows))
    img = results.get("images")
    if img:
        rows = [[kind, f(img[kind]["median"]), f(img[kind]["min"]), f(img[kind]["max"])]
                for kind in ("cold", "warm")]
        parts.append(section(f"chroot-create of the default image ({int(img['cold']['n'])} "
                             f"rounds, mirror {img['mirror']}; "
                             f"{img['package_cache_bytes'] / 1e6:.0f} MB of packages, image "
                             f"{img['image_bytes'] / 1e6:.0f} MB)",
                             ["package cache", "median", "min", "max"], rows))
    imp = results.get("imports")
    if imp:
        rows = []
        for kind, data in imp.items():
            top = [p for p in data["packages"] if p["ms"] >= 1.0][:6]
            rows.append([kind, f"{data['total_ms']['median']:.0f} ms",
                         ", ".join(f"{p['package']} {p['ms']:.0f}"
                                   + (f" (via {p['imported_by']})" if p["imported_by"] else "")
                                   for p in top)])
        parts.append(section("Imports per stage call under python -X importtime (medians, ms; "
                             "a package with the stdlib modules it pulled in)",
                             ["call", "imports", "largest packages"], rows, left=(0, 2)))
    for b in backends:
        ts = [Target(**t) for t in results.get("targets", {}).get(b, [])]
        if ts:
            rows = [[t.name, t.wanted, t.measured,
                     {True: "met", False: "NOT MET", None: "-"}[t.met]] for t in ts]
            parts.append(section(f"Targets of issue 10 on {b}",
                                 ["target", "wanted", "measured", "result"], rows,
                                 left=(0, 1, 2, 3)))
    return "\n\n".join(parts) + "\n"


def meta(args: argparse.Namespace, parts: Sequence[str]) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "label": args.label,
        "systemd": sh("systemd-nspawn", "--version").split("\n")[0].removeprefix("systemd "),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "parts": list(parts),
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts: {', '.join(PARTS)} (default: all)")
    p.add_argument("--rounds", type=int, default=9, help="jobs per variant after the warm-up")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds, not counted")
    p.add_argument("--backends", default="btrfs,overlay", help="btrfs, overlay or both")
    p.add_argument("--startup-rounds", type=int, default=20)
    p.add_argument("--concurrent", type=int, default=8, help="jobs at once")
    p.add_argument("--concurrent-rounds", type=int, default=2)
    p.add_argument("--image-rounds", type=int, default=2)
    p.add_argument("--imports-rounds", type=int, default=2)
    p.add_argument("--pool-size", type=int, default=2,
                   help="pool_size for the pooled variant (once the driver has it)")
    p.add_argument("--mirror-dir", type=Path,
                   help="a local mirror (bench/mirror.py) to build images from; without it "
                   "the bed's own apt mirror is used, which needs the network")
    p.add_argument("--no-images", action="store_true", help="skip the images part")
    p.add_argument("--json", type=Path, default=HERE / "results" / "latest.json")
    p.add_argument("--label", default="", help="e.g. the commit measured")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="measure nothing: print the tables of an earlier run's JSON")
    p.add_argument("--markdown", action="store_true", help="with --render: as Markdown")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    if args.no_images and "images" in only:
        only.remove("images")
    args.parts = only
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backend_list if b not in ROOTS]
    if bad or not args.backend_list:
        p.error(f"--backends takes btrfs and/or overlay, not {args.backends!r}")
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be at least 1 and --warmup at least 0")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.render:
        earlier = json.loads(args.render.read_text())
        backends = [b for b in ROOTS if b in earlier.get("targets", {})]
        print(render(earlier, backends, args.markdown), end="")
        return 0
    if os.geteuid() != 0 or not os.path.isdir("/run/systemd/system"):
        log("needs root and systemd as PID 1: run it in the test bed with bench/run")
        return 2
    for backend in args.backend_list:
        if not (ROOTS[backend] / "images" / IMAGE).is_dir():
            log(f"no image {ROOTS[backend] / 'images' / IMAGE}: this is not the test bed?")
            return 2
    found = leftovers()
    if found:
        log(f"the bed has leftovers of an earlier run, start it afresh: {found}")
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nspawn-runner-bench-"))
    bench = Bench(workdir, args.pool_size)
    results: dict[str, Any] = {"meta": meta(args, args.parts), "parts": args.parts}
    failed: str | None = None
    pooled = False
    try:
        if JOB_PARTS & set(args.parts):
            pooled = pool_supported(bench)
            drivers = [SHELL, OURS, *([POOLED] if pooled else [])]
            log("pool_size is a setting: measuring the pool" if pooled
                else "no pool_size setting yet: the pool is not measured")
            variants = [Variant(d, b) for b in args.backend_list for d in drivers]
            samples = lifecycle(bench, variants, args.rounds, args.warmup)
            results["lifecycle"] = stats_of(samples)
            results["samples"] = samples
        if "stages" in args.parts:
            results["startup_backend"] = args.backend_list[0]
            results["startup"] = startup(bench, args.startup_rounds, args.backend_list[0])
        if "concurrent" in args.parts:
            variants = [Variant(d, b) for b in args.backend_list for d in (SHELL, OURS)]
            results["concurrent"] = concurrent(bench, variants, args.concurrent,
                                               args.concurrent_rounds)
        if "imports" in args.parts:
            results["imports"] = imports(bench, args.imports_rounds)
        if "images" in args.parts:
            if args.mirror_dir:
                with serve(args.mirror_dir) as url:
                    results["images"] = images(args.image_rounds, url)
            else:
                results["images"] = images(args.image_rounds, None)
    except (BenchError, TimeoutError, subprocess.TimeoutExpired) as e:
        failed = str(e)
        log(f"FAILED: {e}")
    finally:
        if pooled:
            drain_pool(bench, args.backend_list)
        left, _ = wait_clean(30)
        results["left_behind_at_end"] = left
        shutil.rmtree(workdir, ignore_errors=True)
    results["meta"]["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    results["targets"] = {b: [asdict(t) for t in targets(results, b)] for b in args.backend_list}
    results["error"] = failed
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results, args.backend_list), end="")
    if left:
        log(f"left behind: {left}")
    log(f"results: {args.json}")
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
