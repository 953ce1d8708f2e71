"""The one way external commands run: argv lists only, logged as a copy-pasteable line at
--verbose, failures raised as `CommandError` carrying argv, exit status and stderr.

subprocess is imported where it is used: the run stage starts its one command with `start`
(os.posix_spawn), and subprocess with what it pulls in costs each run call 4 ms."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from nspawn_runner import log
from nspawn_runner.errors import CommandError
from nspawn_runner.record import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path
    from typing import IO

Argv = Sequence["str | Path"]

# What external commands inherit from our environment: never the job's variables
# (CUSTOM_ENV_*), the job token or the protocol's files, and no SYSTEMD_* switch (such as
# SYSTEMD_SECCOMP=0) that would change how a machine is isolated.
_KEEP = frozenset({"PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ",
                   "TERM", "TMPDIR", "HOME", "USER", "LOGNAME", "SYSTEMD_LOG_LEVEL",
                   "SYSTEMD_PAGER", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY",
                   "HTTPS_PROXY", "NO_PROXY", "SUDO_USER", "SUDO_UID", "SUDO_GID",
                   "GNUPGHOME"})
DEVNULL = -3  # subprocess.DEVNULL, without importing subprocess for it


def child_env() -> dict[str, str]:
    """The environment every external command gets unless a caller passes its own."""
    env = {k: v for k, v in os.environ.items() if k in _KEEP}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin")
    return env


def _argv(cmd: Argv) -> list[str]:
    """`cmd` as strings, logged as a copy-pasteable line at --verbose."""
    argv = [os.fspath(c) for c in cmd]
    if log.verbose():
        log.debug("+ " + log.redact_argv(argv))
    return argv


def run(
    cmd: Argv,
    *,
    check: bool = True,
    capture: bool = False,
    stdin: int | IO[bytes] | None = DEVNULL,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd`. stderr is always captured (it goes into the error); stdout only with
    `capture`, otherwise to our stderr so a command's chatter never pollutes a stage's stdout."""
    import subprocess

    argv = _argv(cmd)
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
    import subprocess

    argv = _argv(cmd)
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, env=child_env())
    except FileNotFoundError as e:
        raise CommandError(argv, 127, f"{argv[0]}: command not found ({e.strerror})") from None


class Timeout(Exception):
    """`Child.wait` timed out."""


class Child:
    """A command started by `start`: its pid, a pidfd to wait on, its exit status."""

    def __init__(self, argv: list[str], pid: int) -> None:
        self.argv = argv
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    def poll(self, timeout: float | None = 0.0) -> int | None:
        """The exit status once the command has ended (waiting at most `timeout` seconds,
        None: for ever), else None."""
        if self.returncode is None:
            import select

            ready, _, _ = select.select([self.pidfd], [], [], timeout)
            if ready:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
                os.close(self.pidfd)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self.poll(timeout)
        if code is None:
            raise Timeout(f"{self.argv[0]} still runs after {timeout}s")
        return code

    def kill(self) -> None:
        if self.returncode is None:
            import signal

            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                return  # ended meanwhile: poll() reaps it


def start(cmd: Argv, *, stdin: int) -> Child:
    """Start `cmd` with `stdin` (a file descriptor) and our stdout/stderr, with os.posix_spawn:
    for the run stage, whose every call would pay for importing subprocess."""
    argv = _argv(cmd)
    import signal  # loaded already: errors.py needs it

    actions = [(os.POSIX_SPAWN_DUP2, stdin, 0)] if stdin != 0 else []
    try:
        # As subprocess does (restore_signals): Python ignores SIGPIPE and SIGXFSZ, and an
        # ignored signal stays ignored across exec.
        pid = os.posix_spawnp(argv[0], argv, child_env(), file_actions=actions,
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    except FileNotFoundError as e:
        raise CommandError(argv, 127, f"{argv[0]}: command not found ({e.strerror})") from None
    return Child(argv, pid)
