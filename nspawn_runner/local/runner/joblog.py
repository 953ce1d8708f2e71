"""The job trace (masked on the way out, optionally streamed live line by line) and
the runner's own log."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from nspawn_runner.local.runner.model import (
    ANSI_BOLD_GREEN,
    ANSI_BOLD_RED,
    ANSI_CLEAR,
    ANSI_RESET,
    ANSI_YELLOW,
    MASKED,
)


class _Sink(Protocol):
    def write(self, data: bytes) -> None: ...


class _Buffer:
    def __init__(self) -> None:
        self.data = bytearray()
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self.data += data


class _RecordSink:
    """Appends to a CallRecord's output (several pump threads may write)."""

    def __init__(self, target: bytearray) -> None:
        self._target = target
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._target += data


class _Tee:
    def __init__(self, *sinks: _Sink) -> None:
        self._sinks = sinks

    def write(self, data: bytes) -> None:
        for sink in self._sinks:
            sink.write(data)


def mask_text(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASKED)
    return text


class _JobLog:
    """The job trace: raw bytes in order, masked on the way out."""

    def __init__(self, live: Callable[[str], None] | None) -> None:
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._live = live
        self._pending = b""
        self.secrets: list[str] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            self._chunks.append(bytes(data))
            if self._live is None:
                return
            self._pending += data
            if b"\n" not in self._pending:
                return
            complete, _, self._pending = self._pending.rpartition(b"\n")
            text = mask_text(complete.decode("utf-8", "replace"), self.secrets)
        for line in text.split("\n"):
            self._live(line)

    def flush_live(self) -> None:
        with self._lock:
            rest, self._pending = self._pending, b""
        if rest and self._live is not None:
            self._live(mask_text(rest.decode("utf-8", "replace"), self.secrets))

    def println(self, text: str = "") -> None:
        self.write((text + "\n").encode())

    def warning(self, text: str) -> None:
        self.println(f"{ANSI_YELLOW}WARNING: {text}{ANSI_RESET}")

    def error(self, text: str) -> None:
        self.println(f"{ANSI_BOLD_RED}ERROR: {text}{ANSI_RESET}")

    def info(self, text: str) -> None:
        self.println(f"{ANSI_BOLD_GREEN}{text}{ANSI_RESET}")

    def section_start(self, name: str) -> None:
        self.write(f"section_start:{int(time.time())}:{name}\r{ANSI_CLEAR}".encode())

    def section_end(self, name: str) -> None:
        self.write(f"section_end:{int(time.time())}:{name}\r{ANSI_CLEAR}".encode())

    def raw_text(self) -> str:
        with self._lock:
            data = b"".join(self._chunks)
        return data.decode("utf-8", "replace")

    def text(self) -> str:
        return mask_text(self.raw_text(), self.secrets)


class _RunnerLog:
    """The runner's own log (logrus lines)."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def log(self, level: str, msg: str, **fields: object) -> None:
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        with self._lock:
            self._lines.append(f"level={level} msg={json.dumps(msg)}{extra}")

    def text(self) -> str:
        with self._lock:
            return "\n".join(self._lines) + ("\n" if self._lines else "")


class _LineLogger:
    """A sink that turns a stream into runner-log lines of one level (cleanup's stdout/err)."""

    def __init__(self, runner_log: _RunnerLog, level: str, stream: str) -> None:
        self._log = runner_log
        self._level = level
        self._stream = stream
        self._pending = b""
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._pending += data
            *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            self._log.log(self._level, line.decode("utf-8", "replace"), cleanup_std=self._stream)

    def close(self) -> None:
        with self._lock:
            rest, self._pending = self._pending, b""
        if rest:
            self._log.log(self._level, rest.decode("utf-8", "replace"), cleanup_std=self._stream)
