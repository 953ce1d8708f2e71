#!/usr/bin/env python3
"""An emulator of how gitlab-runner 19.x drives a custom-executor driver.

The real runner cannot be downloaded here, so the tests drive the driver with this instead. It
follows ``shared/custom-executor-protocol.md`` (gitlab-runner 19.4, ``executors/custom``,
``common/build.go``, ``shells/``), where the code decides:

* a per-attempt ``$TMPDIR/custom-executorNNN`` temp dir with ``response.json`` (0600);
* the call environment in the runner's order (``os.environ``, the five defaults, ``job_env``,
  then ``CUSTOM_ENV_*``; the last value wins);
* config (stdout parsed strictly as JSON), prepare, one run call per stage with a fresh
  ``<tmp>/scriptNNN/script`` (0700) in the 19.1+ bash format, cleanup (its output goes to the
  runner log only), then ``rm -r`` of the temp dir;
* the exit-code mapping (0, 1 + ``BUILD_EXIT_CODE_FILE``, 2, anything else), config+prepare
  retries, ``GET_SOURCES_ATTEMPTS`` and friends with ``clear_worktree``;
* the stage order and skipping, ``CI_JOB_STATUS`` for ``after_script`` and later;
* process groups, SIGTERM -> graceful timeout -> SIGKILL -> force timeout -> give up;
* UI cancel (only the script context: after_script still runs), abort and job timeout (the
  whole job context: only cleanup runs), ``RUNNER_SCRIPT_TIMEOUT``;
* a job log with masked values (and the raw one, so tests can check what the driver printed).

The emulation itself lives in the package (nspawn_runner/local/runner/), where
``nspawn-runner exec`` uses it too; this module re-exports it for the tests and keeps the
demo. ``run_job()`` is the entry point for tests; ``demo_main()`` runs a small job against
a driver and prints its log live::

    python3 tests/gitlab_emulator.py --driver /usr/bin/nspawn-runner --script 'echo hi'
"""


from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence

from nspawn_runner.local.runner import *  # noqa: F403  (the tests' view of the emulator)
from nspawn_runner.local.runner import (
    DEFAULT_FORCE_KILL_TIMEOUT,
    DEFAULT_GRACEFUL_KILL_TIMEOUT,
    RunnerConfig,
    job_from_dict,
    run_job,
    strip_ansi,
)


def demo_main(argv: Sequence[str] | None = None) -> int:
    """Run one job against a driver, printing the job log live. Exit 0 on success."""
    parser = argparse.ArgumentParser(
        prog="gitlab_emulator.py",
        description="Run a CI job through a custom-executor driver like gitlab-runner 19.x.")
    parser.add_argument("--driver", required=True,
                        help="the driver command (shell words); config|prepare|run|cleanup "
                             "are appended")
    parser.add_argument("--job", help="the job as JSON, or @FILE / a path to a JSON file")
    parser.add_argument("--script", action="append", default=[], help="a script line")
    parser.add_argument("--after-script", action="append", default=[])
    parser.add_argument("--image")
    parser.add_argument("--var", action="append", default=[], metavar="K=V")
    parser.add_argument("--masked-var", action="append", default=[], metavar="K=V")
    parser.add_argument("--timeout", type=int, help="job timeout in seconds")
    parser.add_argument("--builds-dir")
    parser.add_argument("--cache-dir")
    parser.add_argument("--graceful-kill-timeout", type=float,
                        default=DEFAULT_GRACEFUL_KILL_TIMEOUT)
    parser.add_argument("--force-kill-timeout", type=float, default=DEFAULT_FORCE_KILL_TIMEOUT)
    parser.add_argument("--plain", action="store_true", help="strip colours and sections")
    parser.add_argument("--show-runner-log", action="store_true",
                        help="print the runner log (cleanup output) at the end")
    args = parser.parse_args(argv)

    data: dict[str, object] = {}
    if args.job:
        source = str(args.job)
        if source.startswith("@"):
            source = source[1:]
        if os.path.isfile(source):
            with open(source, encoding="utf-8") as f:
                source = f.read()
        loaded = json.loads(source)
        if not isinstance(loaded, dict):
            parser.error("--job must be a JSON object")
        data.update(loaded)
    if args.script:
        data["script"] = list(args.script)
    if args.after_script:
        data["after_script"] = list(args.after_script)
    if args.image:
        data["image"] = args.image
    if args.timeout:
        data["timeout"] = args.timeout
    if "script" not in data:
        parser.error("give --script or a --job with a script")
    job = job_from_dict(data)
    for entry in [*args.var, *args.masked_var]:
        key, sep, value = str(entry).partition("=")
        if not sep:
            parser.error(f"expected K=V, got {entry!r}")
        job.variables[key] = value
        if entry in args.masked_var:
            job.masked_variables.add(key)

    driver = shlex.split(args.driver)
    if not driver:
        parser.error("--driver is empty")
    # The runner starts the driver with the temp dir as its cwd, so a relative path would be
    # looked up there: make one given relative to here absolute.
    if "/" in driver[0] and not os.path.isabs(driver[0]):
        driver[0] = os.path.abspath(driver[0])
    config = RunnerConfig(
        run_exec=[*driver, "run"], config_exec=[*driver, "config"],
        prepare_exec=[*driver, "prepare"], cleanup_exec=[*driver, "cleanup"],
        builds_dir=args.builds_dir, cache_dir=args.cache_dir,
        graceful_kill_timeout=args.graceful_kill_timeout,
        force_kill_timeout=args.force_kill_timeout)

    def show(line: str) -> None:
        print(strip_ansi(line) if args.plain else line, flush=True)

    result = run_job(config, job, live_output=show)
    if args.show_runner_log:
        print("--- runner log (cleanup output) ---")
        print(result.runner_log, end="")
    detail = f" (exit code {result.exit_code})" if result.exit_code is not None else ""
    print(f"Job status: {result.status}{detail}", flush=True)
    return 0 if result.status == "success" else 1


if __name__ == "__main__":
    sys.exit(demo_main())
