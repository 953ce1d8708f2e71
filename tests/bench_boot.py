"""Boot time of a job's machine with the driver's own boot command and with variants of it
(--suppress-sync, masked units, another default target, SYSTEMD_SECCOMP=0), interleaved,
medians; and what --suppress-sync does to a sync-heavy step. For docs/performance.md.

Inside the test bed:
    tests/testbed.py exec -- /opt/nspawn-runner/bin/python /src/tests/bench_boot.py \
        [--rounds 9] [--root /srv/btrfs/nspawn-runner]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nspawn_runner.host import backends, machine

IMAGE = "bookworm"
# Units of a Debian guest that a CI job has no use for (what they do, docs/performance.md).
MASK = ["console-getty.service", "getty.target", "systemd-update-utmp.service",
        "systemd-update-utmp-runlevel.service", "systemd-journal-flush.service",
        "sys-fs-fuse-connections.mount", "dev-hugepages.mount", "systemd-user-sessions.service"]
TIMERS = ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
          "e2scrub_all.timer", "systemd-tmpfiles-clean.timer"]
VARIANTS: dict[str, tuple[list[str], list[str], list[str]]] = {
    # name: (systemd-run options, systemd-nspawn options, arguments for the guest's init)
    "nothing masked": ([], [], []),
    "--suppress-sync=yes": ([], ["--suppress-sync=yes"], []),
    "mask CI-useless units": ([], [], [f"systemd.mask={u}" for u in MASK]),
    "mask units + timers": ([], [], [f"systemd.mask={u}" for u in MASK + TIMERS]),
    "mask units + logind": ([], [], [f"systemd.mask={u}" for u in
                                     [*MASK, "systemd-logind.service"]]),
    "mask journal-flush only": ([], [], ["systemd.mask=systemd-journal-flush.service"]),
    "mask utmp only": ([], [], ["systemd.mask=systemd-update-utmp.service",
                                "systemd.mask=systemd-update-utmp-runlevel.service"]),
    "mask getty only": ([], [], ["systemd.mask=console-getty.service",
                                 "systemd.mask=getty.target"]),
    "mask units + suppress-sync": ([], ["--suppress-sync=yes"],
                                   [f"systemd.mask={u}" for u in MASK]),
    "default target basic.target": ([], [], ["systemd.unit=basic.target"]),
    "SYSTEMD_SECCOMP=0": (["--setenv=SYSTEMD_SECCOMP=0"], [], []),
}
# A step that syncs the way dpkg and databases do: 2000 writes of 4 KiB, each followed by
# fsync() (perl-base is in every Debian image). Not O_DSYNC: with --suppress-sync=yes, open()
# with O_SYNC or O_DSYNC fails with EINVAL.
SYNC_STEP = ("perl -e 'use IO::Handle; open(my $f, \">\", \"/root/synced\") or die; "
             "for (1..2000) { print $f \"x\" x 4096; $f->flush; $f->sync or die }'")


def command(name: str, root: Path, variant: str) -> list[str]:
    run_opts, nspawn_opts, init_args = VARIANTS[variant]
    spec = machine.BootSpec(
        machine=name, unit=f"bench-{name}.service", image=IMAGE,
        image_path=root / "images" / IMAGE, backend=backends.choose("auto", root), root=root,
        boot_timeout=120, stop_timeout=30,
        binds=((Path(f"/run/bench-boot/{name}"), "/run/nspawn-runner"),))
    cmd = machine.boot_command(spec)
    split = cmd.index("--")
    return [*cmd[:split], *run_opts, *cmd[split:], *nspawn_opts, *init_args]


def in_machine(name: str, script: str) -> float:
    start = time.perf_counter()
    subprocess.run(["systemd-run", "--quiet", f"--machine={name}", "--pipe", "--wait",
                    "/bin/sh", "-c", script], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def one(root: Path, variant: str, n: int, sync_step: bool) -> tuple[float, float, float]:
    """(seconds until ready, until a first command ran, the sync step)"""
    name = f"bb-{os.getpid()}-{n}"
    Path(f"/run/bench-boot/{name}").mkdir(parents=True, exist_ok=True)
    if backends.choose("auto", root) is backends.Backend.OVERLAY:
        (root / "overlays" / name / "upper").mkdir(parents=True)
    start = time.perf_counter()
    try:
        subprocess.run(command(name, root, variant), check=True)
        ready = time.perf_counter() - start
        in_machine(name, "true")
        first = time.perf_counter() - start
        synced = in_machine(name, SYNC_STEP) if sync_step else 0.0
    finally:
        subprocess.run(["systemctl", "stop", f"bench-{name}.service"], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", f"/run/bench-boot/{name}",
                        root / "overlays" / name], check=False)
    return ready, first, synced


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--root", default="/srv/btrfs/nspawn-runner")
    args = parser.parse_args()
    root = Path(args.root)
    times: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
    n = 0
    for r in range(args.rounds + 1):  # round 0: warm-up
        for variant in VARIANTS:
            n += 1
            sample = one(root, variant, n, variant in ("nothing masked",
                                                       "--suppress-sync=yes"))
            if r:
                times[variant].append(sample)
    print(f"{args.rounds} boots each after a warm-up, {root}, medians (ms):")
    print(f"  {'variant':<30} {'ready':>7} {'1st cmd':>8} {'sync step':>10}")
    for variant, samples in times.items():
        ready, first, synced = (statistics.median(s[i] for s in samples) for i in range(3))
        shown = f"{synced * 1000:10.0f}" if synced else f"{'':>10}"
        print(f"  {variant:<30} {ready * 1000:7.0f} {first * 1000:8.0f} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
