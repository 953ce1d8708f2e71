"""Part (4): jobs at once on one image: jobs per minute, disk per job, all succeed, nothing
left behind."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import report
from gitlab_emulator import Job, JobRun
from variants import SHELL, Bench, BenchError, Variant, log, rotated, sh, wait_clean


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
