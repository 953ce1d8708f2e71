"""Benchmark of chroot-create: a minbase bookworm image (the required packages plus `less`)
with a cold package cache (emptied before the build: everything is downloaded) and a warm one
(the same packages already cached), per bootstrap tool, interleaved, medians.

Inside the test bed (it needs root, systemd-nspawn and the Debian mirror):

    tests/testbed.py exec -- /opt/nspawn-runner/bin/python /src/tests/bench_images.py \\
        [--rounds 3] [--root /srv/btrfs/bench-nspawn-runner] [mmdebstrap debootstrap]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

NAME = "bench"


def build(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(["nspawn-runner", "chroot-create", NAME], env=env, check=True,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*.deb")) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tools", nargs="*", default=["mmdebstrap", "debootstrap"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path("/srv/btrfs/bench-nspawn-runner"))
    args = parser.parse_args()
    root: Path = args.root
    files, cache = root / "images.d", root / "package-cache"
    files.mkdir(parents=True, exist_ok=True)
    settings = root / "config.toml"
    settings.write_text(f'root = "{root}"\nimages_config_dir = "{files}"\n')
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": str(settings)}
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(root)], capture_output=True,
                        text=True).stdout.strip()
    rows = []
    try:
        for tool in args.tools:
            (files / f"{NAME}.toml").write_text(
                f'bootstrap = "{tool}"\nsuite = "bookworm"\nvariant = "minbase"\n'
                'packages = ["less"]\n')
            times: dict[str, list[float]] = {"cold": [], "warm": []}
            downloaded = 0.0
            for _ in range(args.rounds):
                shutil.rmtree(cache, ignore_errors=True)
                times["cold"].append(build(env))
                downloaded = size_mb(cache)
                times["warm"].append(build(env))  # interleaved: drift hits both alike
            for kind, values in times.items():
                rows.append((tool, kind, statistics.median(values), min(values), max(values),
                             downloaded if kind == "cold" else 0.0))
    finally:
        if (root / "images" / NAME).exists():
            subprocess.run(["nspawn-runner", "chroot-remove", NAME], env=env, check=False)
        shutil.rmtree(root, ignore_errors=True)
    print(f"chroot-create, minbase bookworm + less, {args.rounds} rounds, state root on {fs}:")
    print(f"  {'tool':<12} {'cache':<5} {'median':>8} {'min':>7} {'max':>7} {'downloaded':>11}")
    for tool, kind, median, low, high, mb in rows:
        print(f"  {tool:<12} {kind:<5} {median:7.1f}s {low:6.1f}s {high:6.1f}s {mb:9.0f}MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
