"""Benchmark of the run stage, the driver's hot path: `nspawn-runner run` against the bare
`systemd-run --machine --pipe --wait` it wraps, on one machine, interleaved, medians.

Inside the test bed: tests/testbed.py exec -- /opt/nspawn-runner/bin/python /src/tests/bench_run.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], stdin_path: str, env: dict[str, str]) -> float:
    with open(stdin_path, "rb") as f:
        start = time.perf_counter()
        subprocess.run(cmd, stdin=f, env=env, stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    tmp = Path(tempfile.mkdtemp(prefix="bench-run-"))
    (tmp / "response.json").write_text(json.dumps({"id": 4242424242}))
    script = tmp / "script"
    script.write_text("echo hello\n")
    settings = tmp / "config.toml"
    settings.write_text('root = "/var/lib/nspawn-runner"\n')
    env = {**os.environ, "JOB_RESPONSE_FILE": str(tmp / "response.json"),
           "NSPAWN_RUNNER_CONFIG": str(settings), "CUSTOM_ENV_CI_JOB_IMAGE": "bookworm",
           "BUILD_EXIT_CODE_FILE": str(tmp / "code")}
    subprocess.run(["nspawn-runner", "prepare"], env=env, check=True,
                   stderr=subprocess.DEVNULL)
    machine = next(p.stem for p in Path("/run/nspawn-runner").glob("nr-4242424242-*.json"))
    try:
        variants = {
            "systemd-run (bare)": ["systemd-run", "--quiet", f"--machine={machine}", "--pipe",
                                   "--wait", "/bin/bash"],
            "nspawn-runner run": ["nspawn-runner", "run", str(script), "build_script"],
            "python3 -c pass": [sys.executable, "-c", "pass"],
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, cmd in variants.items():  # interleaved: drift hits all alike
                times[name].append(timed(cmd, str(script), env))
    finally:
        subprocess.run(["nspawn-runner", "cleanup"], env=env, check=True)
    base = statistics.median(times["systemd-run (bare)"])
    print(f"{rounds} rounds, medians (ms), ratio to bare systemd-run:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<22} {median * 1000:7.1f} ms   x{median / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
