"""The failure classes of the driver. They are raised deep and turned into exit codes only at the
top (`main.exit_code_for`), following the custom-executor protocol: a job's own failure is a build
failure, everything else a system failure (which gitlab-runner retries for config and prepare)."""

from __future__ import annotations


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
        from nspawn_runner.proc import redact_argv

        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"{redact_argv(argv)} failed with status {returncode}: {detail}")


class CiConfigError(NspawnRunnerError):
    """A .gitlab-ci.yml that GitLab would reject, or a job using what `exec` cannot do."""
