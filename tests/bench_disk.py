"""Disk use over sequential jobs: cleanup returns before the machine's layer is removed (its unit
removes it when it has stopped), so this checks that the removal keeps up and the next job never
finds the disk filling. Each job writes MiB into its writable root, then the next job starts as
soon as cleanup returns, as gitlab-runner would start it.

Inside the test bed:
    tests/testbed.py exec -- /opt/nspawn-runner/bin/python /src/tests/bench_disk.py \
        [--jobs 50] [--mib 200] [--root /srv/btrfs/nspawn-runner]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024


def used(root: Path) -> int:
    st = os.statvfs(root)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def layers(root: Path) -> int:
    """Bytes in the overlays directory: the writable layers not removed yet (exact, where the
    file system's use also counts everyone else's writes on a shared disk)."""
    out = subprocess.run(["du", "-s", "-x", "--block-size=1", root / "overlays"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else 0


def stage(exe: str, args: list[str], env: dict[str, str], stdin: Path | None = None) -> None:
    with open(stdin or os.devnull, "rb") as f:
        subprocess.run([exe, *args], env=env, stdin=f, stdout=subprocess.DEVNULL, check=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--root", default="/srv/btrfs/nspawn-runner")
    parser.add_argument("--exe", default="nspawn-runner", help="the driver to measure")
    args = parser.parse_args()
    root = Path(args.root)
    tmp = Path(tempfile.mkdtemp(prefix="bench-disk-"))
    script = tmp / "script"
    # Not /tmp: nspawn mounts a tmpfs there. fsync: the blocks are on disk, not in the cache.
    script.write_text(f"dd if=/dev/urandom of=/root/fill bs=1M count={args.mib} "
                      "conv=fsync status=none\n")
    settings = tmp / "config.toml"
    settings.write_text(f'root = "{root}"\n')
    env = {**os.environ, "JOB_RESPONSE_FILE": str(tmp / "response.json"),
           "NSPAWN_RUNNER_CONFIG": str(settings), "CUSTOM_ENV_CI_JOB_IMAGE": "bookworm",
           "BUILD_EXIT_CODE_FILE": str(tmp / "code")}
    base = used(root)
    at_prepare = []  # what each next job finds, above the starting point
    layers_at_prepare = []
    start = time.monotonic()
    for n in range(args.jobs):
        (tmp / "response.json").write_text(json.dumps({"id": 800000000 + n}))
        at_prepare.append(used(root) - base)
        layers_at_prepare.append(layers(root))
        stage(args.exe, ["prepare"], env)
        stage(args.exe, ["run", str(script), "build_script"], env, script)
        stage(args.exe, ["cleanup"], env)
    elapsed = time.monotonic() - start
    after = used(root) - base
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        busy = subprocess.run(["machinectl", "list", "--no-legend"], capture_output=True,
                              text=True).stdout.strip()
        if not busy:
            break
        time.sleep(0.2)
    fstype = subprocess.run(["stat", "-f", "-c", "%T", root], capture_output=True,
                            text=True).stdout.strip()
    if fstype == "btrfs":
        # btrfs frees a deleted snapshot's blocks in the background.
        subprocess.run(["btrfs", "subvolume", "sync", root], check=False,
                       stdout=subprocess.DEVNULL)
    settled = used(root) - base
    print(f"{args.exe}: {args.jobs} jobs writing {args.mib} MiB each on {root} ({fstype}) in "
          f"{elapsed:.0f} s:")
    print(f"  writable layers not yet removed when a job's prepare began: max "
          f"{max(layers_at_prepare) / MiB:.0f} MiB")
    median = sorted(at_prepare)[len(at_prepare) // 2]
    print(f"  disk use above the start when each job's prepare began: max "
          f"{max(at_prepare) / MiB:.0f} MiB, median {median / MiB:.0f} MiB")
    print(f"  right after the last cleanup returned: {after / MiB:.0f} MiB; "
          f"once everything settled: {settled / MiB:.0f} MiB")
    print("  per job:", " ".join(f"{u / MiB:.0f}" for u in at_prepare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
