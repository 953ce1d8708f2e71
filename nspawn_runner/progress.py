"""Long operations as named steps with their duration (like mkosi), and external tools whose
chatter shows only with --verbose.

    with Step("bootstrap bookworm (mmdebstrap)"):
        run_tool([...])

prints `bootstrap bookworm (mmdebstrap) ... done in 14.2s` on stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import TracebackType

from nspawn_runner import log, proc
from nspawn_runner.errors import CommandError

# Lines of a failed tool's output shown without --verbose: enough for apt's or dpkg's error.
FAILURE_TAIL = 25


def _write(text: str) -> None:
    sys.stderr.write(log.mask(text))
    sys.stderr.flush()


class Step:
    """A named step: its name when it starts, `done`/`failed` and the duration when it ends.
    Without --verbose both go on one line; with it, the tool output in between gets its own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = 0.0
        self.duration = 0.0

    def __enter__(self) -> Step:
        self.start = time.monotonic()
        _write(f"{self.name} ...\n" if log.verbose() else f"{self.name} ... ")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.duration = time.monotonic() - self.start
        status = "done" if exc_type is None else "failed"
        prefix = f"{self.name}: " if log.verbose() else ""
        _write(f"{prefix}{status} in {self.duration:.1f}s\n")


def stop(child: subprocess.Popen[bytes]) -> None:
    """End a tool we were interrupted in, and wait for it: it must have released (unmounted)
    its target before anyone removes that."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def wait(child: subprocess.Popen[bytes]) -> int:
    """The child's exit status; if we are interrupted (SIGTERM, Ctrl-C) it is stopped first."""
    try:
        return child.wait()
    except BaseException:
        stop(child)
        raise


def run_tool(cmd: proc.Argv) -> None:
    """Run a long tool (a bootstrapper, a provisioning command). Its output streams to stderr
    with --verbose; otherwise it is kept and its last lines are shown if the tool fails."""
    argv = [os.fspath(c) for c in cmd]
    if not log.verbose():
        result = proc.run(argv, capture=True, check=False)
        if result.returncode != 0:
            lines = (result.stdout + "\n" + result.stderr).strip().splitlines()
            if lines:
                _write("\n" + "\n".join(lines[-FAILURE_TAIL:]) + "\n")
            raise CommandError(argv, result.returncode, result.stderr or result.stdout)
        return
    # proc.spawn gives the child our stdout; a tool's chatter belongs on stderr, so fd 1 is
    # pointed there while the child starts (the child keeps what it inherited).
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        child = proc.spawn(argv, stdin=subprocess.DEVNULL)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    code = wait(child)
    if code != 0:
        raise CommandError(argv, code, "see its output above")
