"""The failure classes of the driver and the one mapping from outcomes to exit codes.

Failures are raised deep and turned into exit codes only by `finish`, called by the CLI (and the
`run` fast path), following the custom-executor protocol: a job's own failure is a build failure,
everything else a system failure (which gitlab-runner retries for config and prepare). Imported
on every stage's hot path: stdlib only, cheap imports."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from nspawn_runner import log


class NspawnRunnerError(Exception):
    """Base class. `str(error)` is the one-line message shown to the user."""


class SystemFailure(NspawnRunnerError):
    """Infrastructure: missing or invalid image, boot failure, machine gone, bad settings."""


class BuildFailure(NspawnRunnerError):
    """The job's script failed with `exit_code` (reported to GitLab as the job's exit code)."""

    def __init__(self, exit_code: int, message: str = "") -> None:
        super().__init__(message or f"job script exited with status {exit_code}")
        self.exit_code = exit_code


class Cancelled(SystemFailure):
    """gitlab-runner sent SIGTERM (job cancelled, timed out or runner stopping)."""


class CommandError(SystemFailure):
    """An external command failed. Carries what is needed to diagnose it."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        message = f"{log.redact_argv(argv)} failed with status {returncode}: {detail}"
        if "No space left on device" in stderr or "Disk quota exceeded" in stderr:
            message += "; " + disk_full_message("")
        super().__init__(message)


class CiConfigError(NspawnRunnerError):
    """A .gitlab-ci.yml that GitLab would reject, or a job using what `exec` cannot do."""


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
    elif isinstance(error, OSError) and error.errno in (_ENOSPC, _EDQUOT):
        log.error(disk_full_message(error.filename))
    elif isinstance(error, SystemExit) and error.code in (0, None):
        return 0
    else:
        import traceback  # only here: run imports this module on its hot path

        detail = "".join(traceback.format_exception(error)) if log.verbose() else repr(error)
        log.error(f"internal error: {detail}; please report it with the output of --verbose")
    return _protocol_code("SYSTEM_FAILURE_EXIT_CODE", 2)


_ENOSPC, _EDQUOT = 28, 122


def disk_full_message(filename: object) -> str:
    """A full file system (or quota) is the host's problem, never the job's."""
    where = f"the file system of {filename}" if filename else "a file system the driver writes"
    return (f"no space left on {where} (or its quota is used up): run `nspawn-runner gc` to "
            "remove leftovers of crashed jobs, lower cache_max_age and builds_max_age, or free "
            "space there (`df -h`, `nspawn-runner chroot-list`)")


def _raise_cancelled(signum: int, frame: FrameType | None) -> None:
    raise Cancelled(f"received {signal.Signals(signum).name}: job cancelled or timed out")


def cancel_on_signals() -> None:
    """gitlab-runner ends a stage with SIGTERM to our process group (SIGINT from a terminal):
    turn both into `Cancelled`, so the stage can undo what it started before exiting."""
    signal.signal(signal.SIGTERM, _raise_cancelled)
    signal.signal(signal.SIGINT, _raise_cancelled)
