"""Console entry point, and the one place where outcomes become exit codes.

Everything but the `run` stage goes through the typer app in cli.py. `run` is called for every
step of every job, so it bypasses typer (about 60 ms of imports) and tomlkit: run_stage.py needs
neither. `nspawn-runner run --help` still goes to typer."""

from __future__ import annotations

import os
import sys

from nspawn_runner import log
from nspawn_runner.errors import BuildFailure, NspawnRunnerError


def _protocol_code(variable: str, default: int) -> int:
    # gitlab-runner publishes the codes it expects; it hard-codes 1 and 2 today.
    try:
        return int(os.environ.get(variable, default))
    except ValueError:
        return default


def finish(error: BaseException | None) -> int:
    """Report `error` on stderr and return the exit code gitlab-runner expects: 0, the build
    failure code, or the system failure code. Never anything else (anything else is an
    "unknown" failure to gitlab-runner)."""
    if error is None:
        return 0
    if isinstance(error, BrokenPipeError):
        # `nspawn-runner settings | head`: the reader is gone, which is no error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    if isinstance(error, BuildFailure):
        log.debug(str(error))
        return _protocol_code("BUILD_FAILURE_EXIT_CODE", 1)
    if isinstance(error, NspawnRunnerError):
        log.error(str(error))
    elif isinstance(error, SystemExit) and error.code in (0, None):
        return 0
    else:
        import traceback  # only here: run imports this module on its hot path

        detail = "".join(traceback.format_exception(error)) if log.verbose() else repr(error)
        log.error(f"internal error: {detail}; please report it with the output of --verbose")
    return _protocol_code("SYSTEM_FAILURE_EXIT_CODE", 2)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["run"] and not {"--help", "-h"} & set(args):
        from nspawn_runner.executor.run import main as run_main

        sys.exit(run_main(args[1:]))
    from nspawn_runner.cli import app

    app(prog_name="nspawn-runner")
