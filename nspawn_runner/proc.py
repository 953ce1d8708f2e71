"""The one way external commands run: argv lists only, logged as a copy-pasteable line at
--verbose, failures raised as `CommandError` carrying argv, exit status and stderr."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING

from nspawn_runner import log
from nspawn_runner.errors import CommandError

if TYPE_CHECKING:
    from pathlib import Path

Argv = Sequence["str | Path"]

# What external commands inherit from our environment: never the job's variables
# (CUSTOM_ENV_*), the job token or the protocol's files, and no SYSTEMD_* switch (such as
# SYSTEMD_SECCOMP=0) that would change how a machine is isolated.
_KEEP = frozenset({"PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ",
                   "TERM", "TMPDIR", "HOME", "USER", "LOGNAME", "SYSTEMD_LOG_LEVEL",
                   "SYSTEMD_PAGER", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY",
                   "HTTPS_PROXY", "NO_PROXY", "SUDO_USER", "SUDO_UID", "SUDO_GID",
                   "GNUPGHOME"})
def child_env() -> dict[str, str]:
    """The environment every external command gets unless a caller passes its own."""
    env = {k: v for k, v in os.environ.items() if k in _KEEP}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin")
    return env


def _argv(cmd: Argv) -> list[str]:
    return [os.fspath(c) for c in cmd]


def run(
    cmd: Argv,
    *,
    check: bool = True,
    capture: bool = False,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd`. stderr is always captured (it goes into the error); stdout only with
    `capture`, otherwise to our stderr so a command's chatter never pollutes a stage's stdout."""
    argv = _argv(cmd)
    if log.verbose():
        log.debug("+ " + log.redact_argv(argv))
    try:
        proc = subprocess.run(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE if capture else 2,
            stderr=subprocess.PIPE,
            env=child_env() if env is None else env,
            timeout=timeout,
            text=True,
            errors="replace",
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandError(argv, 127, f"{argv[0]}: command not found ({e.strerror})") from None
    except subprocess.TimeoutExpired as e:
        raise CommandError(argv, 124, f"timed out after {timeout}s") from e
    if proc.stderr and log.verbose():
        log.debug(proc.stderr.rstrip())
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc


def spawn(cmd: Argv, *, stdin: int | IO[bytes] | None = None,
          stdout: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Start `cmd` with our stdout/stderr (or `stdout`), for output that must stream through
    unbuffered."""
    argv = _argv(cmd)
    if log.verbose():
        log.debug("+ " + log.redact_argv(argv))
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, env=child_env())
    except FileNotFoundError as e:
        raise CommandError(argv, 127, f"{argv[0]}: command not found ({e.strerror})") from None
