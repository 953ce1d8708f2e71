"""Parts (1) to (3) and the imports: whole jobs, their stage calls, the first command, the
CLI's start-up, and `python -X importtime` of each stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import report
from gitlab_emulator import JobResult, job_payload
from report import Stats
from variants import (
    IMAGE,
    NR,
    OURS,
    SHELL,
    SHELL_DRIVER,
    Bench,
    BenchError,
    Variant,
    interpreter,
    log,
    rotated,
)

STAGE_KEYS = ("config", "prepare", "run", "cleanup")


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


def pool_supported(bench: Bench) -> bool:
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": os.fspath(bench.settings("btrfs"))}
    out = subprocess.run([NR, "settings", "--json"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"{NR} settings --json failed: {out.stderr}")
    settings: dict[str, object] = json.loads(out.stdout).get("settings", {})
    return "pool_size" in settings


def drain_pool(bench: Bench, backends: Sequence[str]) -> None:
    """Stop the pool's idle machines (`nspawn-runner pool drain`) and let gc remove the rest;
    pool_size = 0 alone would leave them up while their runner (the emulator) lives."""
    for backend in backends:
        path = bench.settings(backend, bench.pool_size)
        env = {**os.environ, "NSPAWN_RUNNER_CONFIG": os.fspath(path)}
        for command in (["pool", "drain"], ["gc"]):
            subprocess.run([NR, *command], env=env, check=False)


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


def stats_of(samples: dict[str, Samples]) -> dict[str, dict[str, Stats]]:
    return {name: {key: report.summary(vals) for key, vals in s.items()}
            for name, s in samples.items()}
