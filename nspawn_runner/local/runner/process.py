"""Contexts (a small stand-in for Go's context.Context), the runner's error kinds, and
the driver processes: own process group, SIGTERM then SIGKILL, exit-code mapping."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from nspawn_runner.local.runner.gocompat import parse_build_exit_code
from nspawn_runner.local.runner.joblog import _Sink
from nspawn_runner.local.runner.model import (
    BUILD_FAILURE_EXIT_CODE,
    CANCELED,
    DEADLINE_EXCEEDED,
    SCRIPT_FAILURE,
    SYSTEM_FAILURE_EXIT_CODE,
    CallRecord,
)


class _Ctx:
    def __init__(self, parent: _Ctx | None = None, timeout: float | None = None) -> None:
        self._parent = parent
        self._lock = threading.Lock()
        self._err: str | None = None
        deadline: float | None = None if timeout is None else time.monotonic() + timeout
        if parent is not None and parent.deadline is not None:
            deadline = parent.deadline if deadline is None else min(deadline, parent.deadline)
        self.deadline: float | None = deadline

    def child(self, timeout: float | None = None) -> _Ctx:
        return _Ctx(self, timeout)

    def cancel(self) -> None:
        with self._lock:
            if self._err is None:
                self._err = CANCELED

    def err(self) -> str | None:
        with self._lock:
            if self._err is not None:
                return self._err
        found = self._parent.err() if self._parent is not None else None
        if found is None and self.deadline is not None and time.monotonic() >= self.deadline:
            found = DEADLINE_EXCEEDED
        if found is None:
            return None
        with self._lock:
            if self._err is None:
                self._err = found
            return self._err


# --------------------------------------------------------------------------------------------
# Errors (the runner's error kinds)
# --------------------------------------------------------------------------------------------


class _Err(Exception):
    """A plain error: a system failure at the job level."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def wrapped(self, message: str) -> _Err:
        """The same kind of error with a new message (Go's ``%w`` keeps the type)."""
        clone = copy.copy(self)
        clone.message = message
        clone.args = (message,)
        return clone


class _BuildError(_Err):
    def __init__(self, message: str, failure_reason: str = SCRIPT_FAILURE,
                 exit_code: int | None = None) -> None:
        super().__init__(message)
        self.failure_reason = failure_reason
        self.exit_code = exit_code


class _UnknownFailure(_Err):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _CtxError(_Err):
    def __init__(self, reason: str) -> None:
        super().__init__("context canceled" if reason == CANCELED else
                         "context deadline exceeded")
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Driver processes
# --------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    returncode: int | None = None
    start_error: str | None = None
    kill_error: str | None = None


def _pump(stream: IO[bytes], sink: _Sink) -> None:
    fd = stream.fileno()
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            sink.write(chunk)
    finally:
        stream.close()


def _killpg(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _run_process(argv: Sequence[str], env: Mapping[str, str], cwd: str, ctx: _Ctx,
                 stdout: _Sink, stderr: _Sink | None, graceful: float, force: float,
                 record: CallRecord) -> _Outcome:
    """Start argv in its own process group and wait for it (and for its output pipes), killing
    the group when ctx ends. stderr None means "into the stdout pipe"."""
    try:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if stderr is None else subprocess.PIPE,
            process_group=0, close_fds=True,
        )
    except (OSError, ValueError) as exc:
        return _Outcome(start_error=f"failed to start command: {exc}")
    assert proc.stdout is not None
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, stdout), daemon=True)]
    if stderr is not None:
        assert proc.stderr is not None
        pumps.append(threading.Thread(target=_pump, args=(proc.stderr, stderr), daemon=True))
    for pump in pumps:
        pump.start()
    phase = 0  # 0 running, 1 SIGTERM sent, 2 SIGKILL sent
    phase_since = 0.0
    while True:
        try:
            proc.wait(timeout=0.01)
            exited = True
        except subprocess.TimeoutExpired:
            exited = False
        if exited:
            for pump in pumps:
                pump.join(0.01)
            if not any(p.is_alive() for p in pumps):
                break
        now = time.monotonic()
        if phase == 0:
            if ctx.err() is not None:
                record.signals_sent.append("SIGTERM")
                if _killpg(proc.pid, signal.SIGTERM):
                    phase, phase_since = 1, now
                else:  # "If SIGTERM fails, SIGKILL is sent at once"
                    record.signals_sent.append("SIGKILL")
                    _killpg(proc.pid, signal.SIGKILL)
                    phase, phase_since = 2, now
        elif phase == 1 and now - phase_since >= graceful:
            record.signals_sent.append("SIGKILL")
            _killpg(proc.pid, signal.SIGKILL)
            phase, phase_since = 2, now
        elif phase == 2 and now - phase_since >= force:
            return _Outcome(returncode=proc.returncode, kill_error=(
                f"failed to kill process PID={proc.pid}, likely process is dormant"))
    return _Outcome(returncode=proc.returncode)


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        pretty = {"SIGKILL": "killed", "SIGTERM": "terminated", "SIGINT": "interrupt",
                  "SIGHUP": "hangup", "SIGQUIT": "quit", "SIGABRT": "aborted",
                  "SIGSEGV": "segmentation fault", "SIGPIPE": "broken pipe"}.get(name, name)
        return f"signal: {pretty}"
    return f"exit status {returncode}"


def map_exit(returncode: int, exit_code_file: str) -> _Err | None:
    """The runner's exit-code mapping (protocol §5)."""
    if returncode == 0:
        return None
    status = _exit_status(returncode)
    if returncode == BUILD_FAILURE_EXIT_CODE:
        try:
            with open(exit_code_file, "rb") as f:
                content: bytes | None = f.read()
        except FileNotFoundError:
            content = None
        if content is None:
            return _BuildError(status, exit_code=BUILD_FAILURE_EXIT_CODE)
        code = parse_build_exit_code(content)
        if code is None:
            first = content.split(b"\n", 1)[0].decode("utf-8", "replace")
            return _UnknownFailure(
                f"unknown Custom executor executable exit code {SYSTEM_FAILURE_EXIT_CODE}; "
                f"executable execution terminated with: {status}; invalid build exit code "
                f"{first!r} in {exit_code_file}", SYSTEM_FAILURE_EXIT_CODE)
        return _BuildError(status, exit_code=code)
    if returncode == SYSTEM_FAILURE_EXIT_CODE:
        return _Err(status)
    code = -1 if returncode < 0 else returncode
    return _UnknownFailure(f"unknown Custom executor executable exit code {code}; "
                           f"executable execution terminated with: {status}", code)
