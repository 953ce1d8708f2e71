"""Wall time of each stage call (config, prepare, run, cleanup) of the installed driver, next to
the hand-written shell driver's commands, interleaved, medians. For the driver's own before/after
comparisons; bench/ holds the project's benchmark.

Inside the test bed:
    tests/testbed.py exec -- /opt/nspawn-runner/bin/python /src/tests/bench_stages.py \
        [--rounds 9] [--root /srv/btrfs/nspawn-runner] [--runs 6] [--pool-size 0] [--json F]
        [--driver before=/opt/nr-before/bin/nspawn-runner]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE = "bookworm"


Sample = tuple[float, float]  # wall seconds, CPU seconds of the command's own processes


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str], stdin: Path | None = None) -> Sample:
    """Wall time, and the CPU time of the command and its children: wall time is noisy on a
    shared machine, CPU time is what the driver's own code costs (systemd's work for it, in
    PID 1, machined and the guest, is not in it)."""
    with open(stdin or os.devnull, "rb") as f:
        cpu = _children_cpu()
        start = time.perf_counter()
        subprocess.run(cmd, stdin=f, env=env, stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start, _children_cpu() - cpu


def registered(machine: str) -> bool:
    out = subprocess.run(["machinectl", "list", "--no-legend"], capture_output=True, text=True)
    return any(line.split()[:1] == [machine] for line in out.stdout.splitlines())


def wait_quiet(prefix: str, timeout: float = 60) -> None:
    """Until no machine of `prefix` is registered and no unit of ours is stopping: a cleanup
    that returns early must not make the next round's prepare pay for its teardown."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["machinectl", "list", "--no-legend"], capture_output=True,
                             text=True).stdout
        units = subprocess.run(["systemctl", "list-units", "--no-legend", "--plain",
                                "--state=deactivating", "nspawn-runner-*"],
                               capture_output=True, text=True).stdout
        if not any(line.startswith(prefix) for line in out.splitlines()) and not units.strip():
            return
        time.sleep(0.05)
    raise SystemExit(f"machines {prefix}* still there after {timeout}s")


def shell_round(root: Path, n: int, runs: int, script: Path, env: dict[str, str],
                times: dict[str, list[Sample]]) -> None:
    """The shell driver of the issue: systemd-run + nspawn -x, systemd-run --machine, machinectl
    terminate and wait until it is gone."""
    machine = f"shell-{os.getpid()}-{n}"
    times["shell prepare"].append(timed(
        ["systemd-run", "--quiet", f"--unit=bench-{machine}", "--collect",
         "--property=Type=notify", "--property=Slice=machine.slice", "--property=Delegate=yes",
         # Without it the guest gets SIGTERM with nspawn, and stops only at the 90 s timeout.
         "--property=KillMode=mixed",
         "--", "systemd-nspawn", "--quiet", "--keep-unit", "--boot", "--notify-ready=yes",
         "-D", str(root / "images" / IMAGE), "-x", f"--machine={machine}",
         "--link-journal=no"], env))
    for _ in range(runs):
        times["shell run"].append(timed(
            ["systemd-run", "--quiet", f"--machine={machine}", "--pipe", "--wait", "/bin/bash"],
            env, script))
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(["machinectl", "terminate", machine], check=True)
    while registered(machine):
        time.sleep(0.01)
    times["shell cleanup"].append((time.perf_counter() - start, _children_cpu() - cpu))


def driver_round(exe: str, label: str, job_id: int, runs: int, script: Path,
                 env: dict[str, str], tmp: Path, times: dict[str, list[Sample]]) -> None:
    (tmp / "response.json").write_text(json.dumps({"id": job_id, "variables": []}))
    times[f"{label}config"].append(timed([exe, "config"], env))
    times[f"{label}prepare"].append(timed([exe, "prepare"], env))
    for i in range(runs):
        times[f"{label}run"].append(timed([exe, "run", str(script), f"step_{i}"], env, script))
    times[f"{label}cleanup"].append(timed([exe, "cleanup"], env))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--root", default="/srv/btrfs/nspawn-runner")
    parser.add_argument("--pool-size", type=int, default=0)
    parser.add_argument("--no-shell", action="store_true")
    parser.add_argument("--driver", action="append", default=[], metavar="LABEL=PATH",
                        help="another nspawn-runner executable to compare (repeatable)")
    parser.add_argument("--json", help="also write the samples here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    script = tmp / "script"
    script.write_text("echo hello\n")
    settings = tmp / "config.toml"
    settings.write_text(f'root = "{args.root}"\npool_size = {args.pool_size}\n'
                        if args.pool_size else f'root = "{args.root}"\n')
    env = {**os.environ, "JOB_RESPONSE_FILE": str(tmp / "response.json"),
           "NSPAWN_RUNNER_CONFIG": str(settings), "CUSTOM_ENV_CI_JOB_IMAGE": IMAGE,
           "BUILD_EXIT_CODE_FILE": str(tmp / "code")}
    drivers = {"": "nspawn-runner"} | dict(d.split("=", 1) for d in args.driver)
    labels = {label: f"{label} " if label else "" for label in drivers}
    names = [f"{labels[d]}{stage}" for d in drivers for stage in
             ("config", "prepare", "run", "cleanup")]
    if not args.no_shell:
        names += ["shell prepare", "shell run", "shell cleanup"]
    times: dict[str, list[Sample]] = {name: [] for name in names}
    # Round 0 is the warm-up: page cache, pool filled, first-boot costs.
    for n in range(args.rounds + 1):
        sample: dict[str, list[Sample]] = {name: [] for name in names}
        for k, (label, exe) in enumerate(drivers.items()):
            job_id = 900000000 + os.getpid() * 1000 + n * 10 + k
            driver_round(exe, labels[label], job_id, args.runs, script, env, tmp, sample)
            wait_quiet("nr-")
        if args.pool_size:
            # The pool machine that replaces the one taken must be up before the next round.
            deadline = time.monotonic() + 60
            while len(list(Path("/run/nspawn-runner").glob("nrp-*.ready"))) < args.pool_size:
                if time.monotonic() > deadline:
                    raise SystemExit("the pool did not refill within 60 s")
                time.sleep(0.05)
        if not args.no_shell:
            shell_round(Path(args.root), n, args.runs, script, env, sample)
            wait_quiet("shell-")
        if n:
            for name, values in sample.items():
                times[name] += values
    if args.pool_size:
        subprocess.run(["nspawn-runner", "pool", "drain"], env=env, check=True)
    print(f"{args.rounds} rounds after a warm-up, root {args.root}, medians (ms):")
    print(f"  {'':<16} {'wall':>7} {'cpu':>7}  {'n':>3} {'min wall':>9} {'max wall':>9}")
    for name, values in times.items():
        wall = [w for w, _ in values]
        cpu = [c for _, c in values]
        print(f"  {name:<16} {statistics.median(wall) * 1000:7.1f} "
              f"{statistics.median(cpu) * 1000:7.1f}  {len(values):>3} "
              f"{min(wall) * 1000:9.1f} {max(wall) * 1000:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
