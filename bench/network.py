#!/usr/bin/env python3
"""What the default network costs: prepare and cleanup with network = "isolated" against
network = "host", and the download throughput of a 100 MB file from the test bed's stand-in
for the internet (tests/testbed.py: http://198.51.100.1/, in a network namespace behind the bed
host's uplink), interleaved, medians.

Stdlib only. Inside the test bed (as root, with the driver installed):

    tests/testbed.py exec -- python3 /src/bench/network.py [--rounds 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOTS = {"btrfs": "/srv/btrfs/nspawn-runner", "overlay": "/var/lib/nspawn-runner"}
MODES = ("isolated", "host")
OUTSIDE = Path("/srv/outside")
SIZE = 100 * 10**6
# bash's /dev/tcp: the job image has no curl. Prints the bytes received (headers included).
DOWNLOAD = ('exec 3<>/dev/tcp/198.51.100.1/80; printf "GET /{name} HTTP/1.0\\r\\n\\r\\n" >&3; '
            "cat <&3 | wc -c")


def stage(name: str, env: dict[str, str]) -> float:
    start = time.monotonic()
    result = subprocess.run(["nspawn-runner", name], env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"bench: {name} failed: {result.stderr.strip()}")
    return elapsed


def download(machine: str, name: str) -> float:
    start = time.monotonic()
    out = subprocess.run(["systemd-run", "--quiet", f"--machine={machine}", "--wait", "--pipe",
                          "--", "/bin/bash", "-c", DOWNLOAD.format(name=name)],
                         capture_output=True, text=True, check=True).stdout
    elapsed = time.monotonic() - start
    if int(out.strip() or 0) < SIZE:
        sys.exit(f"bench: the download got {out.strip()} bytes, not {SIZE}")
    return elapsed


def machine_of(job_id: int) -> str:
    listed = subprocess.run(["machinectl", "list", "--no-legend"], capture_output=True,
                            text=True, check=True).stdout
    (name,) = [line.split()[0] for line in listed.splitlines()
               if line.startswith(f"nr-{job_id}-")]
    return name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--backends", default="btrfs,overlay")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    big = OUTSIDE / "bench-100M"
    with big.open("wb") as f:
        f.truncate(SIZE)  # sparse: the server reads zeros from the page cache
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    job_id = int(time.time()) % 10**6 * 1000
    try:
        with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
            response = Path(tmp) / "response.json"
            config = Path(tmp) / "config.toml"
            for backend in args.backends.split(","):
                per_mode = results.setdefault(backend, {})
                # One warm-up round, then interleaved rounds: both modes see the same load.
                for round_ in range(args.rounds + 1):
                    for mode in MODES:
                        job_id += 1
                        response.write_text(json.dumps({"id": job_id}))
                        config.write_text(f'root = "{ROOTS[backend]}"\nnetwork = "{mode}"\n')
                        env = {**os.environ, "JOB_RESPONSE_FILE": str(response),
                               "NSPAWN_RUNNER_CONFIG": str(config),
                               "CUSTOM_ENV_CI_JOB_IMAGE": "bookworm"}
                        prepare = stage("prepare", env)
                        try:
                            fetch = download(machine_of(job_id), big.name)
                        finally:
                            cleanup = stage("cleanup", env)
                        if round_:
                            times = per_mode.setdefault(mode, {})
                            times.setdefault("prepare", []).append(prepare)
                            times.setdefault("cleanup", []).append(cleanup)
                            times.setdefault("download", []).append(fetch)
    finally:
        big.unlink()
    print(f"network cost, medians of {args.rounds} interleaved rounds "
          "(prepare and cleanup: the stage's wall time; download: 100 MB over HTTP from the "
          "stand-in outside, in the job)")
    print(f"{'backend':8} {'network':9} {'prepare':>9} {'cleanup':>9} {'download':>9} "
          f"{'MB/s':>7}")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for backend, per_mode in results.items():
        for mode, times in per_mode.items():
            med = {k: statistics.median(v) for k, v in times.items()}
            summary.setdefault(backend, {})[mode] = med
            print(f"{backend:8} {mode:9} {med['prepare']:8.3f}s {med['cleanup']:8.3f}s "
                  f"{med['download']:8.3f}s {SIZE / 1e6 / med['download']:7.0f}")
        if set(per_mode) == set(MODES):
            iso, host = summary[backend]["isolated"], summary[backend]["host"]
            print(f"{backend:8} {'+isolated':9} {iso['prepare'] - host['prepare']:+8.3f}s "
                  f"{iso['cleanup'] - host['cleanup']:+8.3f}s "
                  f"{iso['download'] - host['download']:+8.3f}s")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "medians": summary,
                                         "samples": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
