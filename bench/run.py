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

lifecycle, stages and first-command come from the same jobs. Stdlib only. This file has the
options, the targets and the tables; variants.py what is measured and the leftover check,
jobs.py parts 1-3 and imports, parallel.py part 4, imagebuilds.py part 5, report.py the pure
parts (statistics, targets, tables, the importtime parser), mirror.py the local mirror.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import imagebuilds
import jobs
import parallel
import report
from report import Target
from variants import (
    HERE,
    IMAGE,
    OURS,
    POOLED,
    ROOTS,
    SHELL,
    Bench,
    BenchError,
    Variant,
    leftovers,
    log,
    sh,
    wait_clean,
)

PARTS = ("lifecycle", "stages", "first-command", "concurrent", "images", "imports")
JOB_PARTS = {"lifecycle", "stages", "first-command"}


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
        keys = [k for k in (*jobs.STAGE_KEYS, "first_command")
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
                             f"rounds, {img['mirror']}; "
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
            pooled = jobs.pool_supported(bench)
            drivers = [SHELL, OURS, *([POOLED] if pooled else [])]
            log("pool_size is a setting: measuring the pool" if pooled
                else "no pool_size setting yet: the pool is not measured")
            variants = [Variant(d, b) for b in args.backend_list for d in drivers]
            samples = jobs.lifecycle(bench, variants, args.rounds, args.warmup)
            results["lifecycle"] = jobs.stats_of(samples)
            results["samples"] = samples
            if pooled:
                # Before the other parts: idle pool machines would count as their leftovers.
                jobs.drain_pool(bench, args.backend_list)
                wait_clean(30)
        if "stages" in args.parts:
            results["startup_backend"] = args.backend_list[0]
            results["startup"] = jobs.startup(bench, args.startup_rounds, args.backend_list[0])
        if "concurrent" in args.parts:
            variants = [Variant(d, b) for b in args.backend_list for d in (SHELL, OURS)]
            results["concurrent"] = parallel.concurrent(bench, variants, args.concurrent,
                                               args.concurrent_rounds)
        if "imports" in args.parts:
            results["imports"] = jobs.imports(bench, args.imports_rounds)
        if "images" in args.parts:
            if args.mirror_dir:
                with imagebuilds.serve(args.mirror_dir) as url:
                    results["images"] = imagebuilds.images(args.image_rounds, url)
            else:
                results["images"] = imagebuilds.images(args.image_rounds, None)
    except (BenchError, TimeoutError, subprocess.TimeoutExpired) as e:
        failed = str(e)
        log(f"FAILED: {e}")
    finally:
        if pooled:
            jobs.drain_pool(bench, args.backend_list)
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
