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

Stdlib only. ``run_job()`` is the entry point for tests; ``demo_main()`` runs a small job against
a driver and prints its log live::

    python3 tests/gitlab_emulator.py --driver /usr/bin/nspawn-runner --script 'echo hi'
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Final, Literal, Protocol
from urllib.parse import urlsplit

RUNNER_VERSION: Final = "19.4.0"
RUNNER_REVISION: Final = "emulated"
RUNNER_ARCH: Final = "amd64"

BUILD_FAILURE_EXIT_CODE: Final = 1
SYSTEM_FAILURE_EXIT_CODE: Final = 2

PREPARATION_RETRIES: Final = 3
DEFAULT_EXEC_TIMEOUT: Final = 3600.0
DEFAULT_GRACEFUL_KILL_TIMEOUT: Final = 600.0
DEFAULT_FORCE_KILL_TIMEOUT: Final = 10.0
DEFAULT_AFTER_SCRIPT_TIMEOUT: Final = 300.0
WAIT_FOR_BUILD_FINISH_TIMEOUT: Final = 300.0
DEFAULT_CACHE_REQUEST_TIMEOUT: Final = 10

ANSI_BOLD_RED: Final = "\x1b[31;1m"
ANSI_BOLD_GREEN: Final = "\x1b[32;1m"
ANSI_BOLD_CYAN: Final = "\x1b[36;1m"
ANSI_YELLOW: Final = "\x1b[0;33m"
ANSI_RESET: Final = "\x1b[0;m"
ANSI_CLEAR: Final = "\x1b[0K"

MASKED: Final = "[MASKED]"

CANCELED: Final = "canceled"
DEADLINE_EXCEEDED: Final = "deadline_exceeded"

# Failure reasons as GitLab knows them.
SCRIPT_FAILURE: Final = "script_failure"
RUNNER_SYSTEM_FAILURE: Final = "runner_system_failure"
JOB_EXECUTION_TIMEOUT: Final = "job_execution_timeout"
JOB_CANCELED: Final = "canceled"
CONFIGURATION_ERROR: Final = "config_error"

JobStatus = Literal["success", "failed", "system_failure", "canceled", "timedout"]

# A representative set of 19.x feature flags with their defaults. Every one is exported to the
# job like the runner does; the emulator acts on FF_SKIP_NOOP_BUILD_STAGES,
# FF_SET_PERMISSIONS_BEFORE_CLEANUP and FF_USE_GIT_BUNDLE_URIS.
FEATURE_FLAGS: Final[dict[str, bool]] = {
    "FF_NETWORK_PER_BUILD": False,
    "FF_USE_LEGACY_KUBERNETES_EXECUTION_STRATEGY": False,
    "FF_USE_DIRECT_DOWNLOAD": True,
    "FF_SKIP_NOOP_BUILD_STAGES": True,
    "FF_USE_FASTZIP": False,
    "FF_DISABLE_UMASK_FOR_DOCKER_EXECUTOR": False,
    "FF_ENABLE_BASH_EXIT_CODE_CHECK": False,
    "FF_USE_WINDOWS_LEGACY_PROCESS_STRATEGY": False,
    "FF_USE_NEW_BASH_EVAL_STRATEGY": False,
    "FF_USE_POWERSHELL_PATH_RESOLVER": False,
    "FF_SCRIPT_SECTIONS": False,
    "FF_ENABLE_JOB_CLEANUP": False,
    "FF_POSIXLY_CORRECT_ESCAPES": False,
    "FF_SET_PERMISSIONS_BEFORE_CLEANUP": True,
    "FF_SECRET_RESOLVING_FAILS_IF_MISSING": True,
    "FF_USE_GIT_BUNDLE_URIS": True,
    "FF_CLEAN_UP_FAILED_CACHE_EXTRACT": False,
    "FF_TIMESTAMPS": False,
    "FF_GIT_URLS_WITHOUT_TOKENS": False,
    "FF_MASK_ALL_DEFAULT_TOKENS": True,
    "FF_USE_EXPONENTIAL_BACKOFF_STAGE_RETRY": True,
    "FF_HASH_CACHE_KEYS": False,
}

STAGE_DESCRIPTIONS: Final[dict[str, str]] = {
    "prepare_script": "Preparing environment",
    "get_sources": "Getting source from Git repository",
    "clear_worktree": "Deleting all tracked and untracked files due to source fetch failure",
    "restore_cache": "Restoring cache",
    "download_artifacts": "Downloading artifacts",
    "after_script": "Running after_script",
    "archive_cache": "Saving cache for successful job",
    "archive_cache_on_failure": "Saving cache for failed job",
    "upload_artifacts_on_failure": "Uploading artifacts for failed job",
    "upload_artifacts_on_success": "Uploading artifacts for successful job",
    "cleanup_file_variables": "Cleaning up project directory and file based variables",
}


# --------------------------------------------------------------------------------------------
# Go compatibility helpers
# --------------------------------------------------------------------------------------------

_SH_LITERAL: Final = frozenset(
    b",-./0123456789@ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
)
_SH_QUOTE: Final = frozenset(b" !\"#$%&()*+:;<=>?[]^`{|}~")
_SH_ESCAPE: Final[dict[int, str]] = {
    0x07: "\\a", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0B: "\\v", 0x0C: "\\f",
    0x0D: "\\r", 0x27: "\\'", 0x5C: "\\\\",
}


def shell_escape(value: str | bytes) -> str:
    """Quote like gitlab-runner's ``helpers.ShellEscape``: bare when safe, else ANSI-C ``$'..'``.

    Backslash, single quote and the C control escapes get their backslash form; every other
    byte outside printable ASCII (including UTF-8 bytes) becomes ``\\xHH``.
    """
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if not data:
        return "''"
    parts: list[str] = []
    needs_quotes = False
    for byte in data:
        if byte in _SH_LITERAL:
            parts.append(chr(byte))
        elif byte in _SH_QUOTE:
            parts.append(chr(byte))
            needs_quotes = True
        elif byte in _SH_ESCAPE:
            parts.append(_SH_ESCAPE[byte])
            needs_quotes = True
        else:
            parts.append(f"\\x{byte:02x}")
            needs_quotes = True
    text = "".join(parts)
    return f"$'{text}'" if needs_quotes else text


_GO_QUOTE_ESCAPES: Final[dict[str, str]] = {
    '"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n",
    "\r": "\\r", "\t": "\\t", "\v": "\\v",
}


def go_quote(text: str) -> str:
    """Go's ``strconv.Quote`` (what ``%q`` prints)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _GO_QUOTE_ESCAPES:
            out.append(_GO_QUOTE_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:  # a surrogate-escaped raw byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


_ATOI_RE: Final = re.compile(r"[+-]?[0-9]+")


def go_atoi(text: str) -> int | None:
    """Go's ``strconv.Atoi``: an optional sign and ASCII digits, nothing else, within int64."""
    if not _ATOI_RE.fullmatch(text):
        return None
    value = int(text)
    if not -(2**63) <= value < 2**63:
        return None
    return value


def parse_build_exit_code(data: bytes) -> int | None:
    """The exit code the runner reads from ``BUILD_EXIT_CODE_FILE``: the first line (as
    ``bufio.Scanner`` gives it, so one trailing CR is dropped) through ``strconv.Atoi``.
    None means "not an integer", which the runner turns into a system failure."""
    first = data.split(b"\n", 1)[0]
    if first.endswith(b"\r"):
        first = first[:-1]
    return go_atoi(first.decode("utf-8", "replace"))


_DURATION_UNITS: Final[dict[str, float]] = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
    "h": 3600.0,
}
_DURATION_RE: Final = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def go_parse_duration(text: str) -> float | None:
    """Go's ``time.ParseDuration`` in seconds, or None when it would fail."""
    sign = 1.0
    rest = text
    if rest[:1] in ("+", "-"):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        return None
    total = 0.0
    pos = 0
    while pos < len(rest):
        match = _DURATION_RE.match(rest, pos)
        if match is None or match.group(1) in ("", "."):
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def go_duration_str(seconds: float) -> str:
    """Go's ``time.Duration.String`` for a non-negative duration given in seconds."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    if nanos < 1_000:
        return f"{nanos}ns"
    if nanos < 1_000_000:
        return f"{_trim_float(nanos / 1e3)}µs"
    if nanos < 1_000_000_000:
        return f"{_trim_float(nanos / 1e6)}ms"
    hours, rem = divmod(nanos, 3_600_000_000_000)
    minutes, rem = divmod(rem, 60_000_000_000)
    secs = _trim_float(rem / 1e9)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _trim_float(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


_SHELL_SPECIAL: Final = "*#$@!?-0123456789"


def _go_shell_name(text: str) -> tuple[str, int]:
    if text[0] == "{":
        if len(text) > 2 and text[1] in _SHELL_SPECIAL and text[2] == "}":
            return text[1:2], 3
        for i in range(1, len(text)):
            if text[i] == "}":
                if i == 1:
                    return "", 2
                return text[1:i], i + 1
        return "", 1
    if text[0] in _SHELL_SPECIAL:
        return text[0:1], 1
    i = 0
    while i < len(text) and (text[i] == "_" or (text[i].isascii() and text[i].isalnum())):
        i += 1
    return text[:i], i


def go_expand(text: str, lookup: Callable[[str], str]) -> str:
    """Go's ``os.Expand`` (``$NAME``, ``${NAME}``; ``$$`` asks the lookup for ``"$"``)."""
    buf: list[str] = []
    start = 0
    j = 0
    while j < len(text):
        if text[j] == "$" and j + 1 < len(text):
            buf.append(text[start:j])
            name, width = _go_shell_name(text[j + 1 :])
            if name == "" and width > 0:
                pass  # bad syntax: the characters are eaten
            elif name == "":
                buf.append("$")
            else:
                buf.append(lookup(name))
            j += width
            start = j + 1
        j += 1
    if not buf:
        return text
    buf.append(text[start:])
    return "".join(buf)


def go_bool(text: str) -> bool | None:
    """gitlab-runner's variable bool: ``strconv.ParseBool`` of the lower-cased value, else an
    integer equal to 1."""
    lowered = text.lower()
    if lowered in ("1", "t", "true"):
        return True
    if lowered in ("0", "f", "false"):
        return False
    number = go_atoi(text)
    if number is not None:
        return number == 1
    return None


def go_path_join(*elems: str) -> str:
    """Go's ``path.Join``: join the non-empty elements with ``/`` and clean the result."""
    joined = "/".join(e for e in elems if e)
    if not joined:
        return ""
    cleaned = posixpath.normpath(joined)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def go_json_dumps(value: object) -> str:
    """Like Go's ``json.Encoder.Encode``: compact, HTML characters escaped, trailing newline."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text + "\n"


_ANSI_RE: Final = re.compile(
    r"section_(?:start|end):[0-9]+:[^\r\n]*\r\x1b\[0K|\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """Remove section markers and colour codes from a job log."""
    return _ANSI_RE.sub("", text)


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobVariable:
    """One job variable as the runner holds it."""

    key: str
    value: str
    public: bool = True
    internal: bool = False
    masked: bool = False
    file: bool = False
    raw: bool = False

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "value": self.value, "public": self.public,
                "masked": self.masked, "file": self.file, "raw": self.raw}


@dataclass
class CacheSpec:
    """One ``cache:`` entry of the job."""

    paths: list[str]
    key: str = ""
    untracked: bool = False
    policy: str = "pull-push"
    when: str = "on_success"
    fallback_keys: list[str] = field(default_factory=list)


@dataclass
class ArtifactSpec:
    """One ``artifacts:`` entry of the job (uploads go through ``gitlab-runner
    artifacts-uploader``; a failure there is fatal, as in the runner)."""

    paths: list[str]
    name: str = ""
    when: str = "on_success"
    expire_in: str = ""
    untracked: bool = False
    exclude: list[str] = field(default_factory=list)
    artifact_type: str = "archive"
    artifact_format: str = "zip"


@dataclass
class ServiceSpec:
    """One ``services:`` entry (only reaches the driver through ``CI_JOB_SERVICES``)."""

    name: str
    alias: str = ""
    entrypoint: list[str] | None = None
    command: list[str] | None = None


@dataclass
class RunnerConfig:
    """The ``[[runners]]`` / ``[runners.custom]`` settings the emulator honours.

    The ``*_exec`` fields are whole argv lists (``exec`` followed by its ``*_args``). Timeouts are
    in seconds; a value <= 0 falls back to the default like config.toml does.
    """

    run_exec: list[str]
    config_exec: list[str] | None = None
    prepare_exec: list[str] | None = None
    cleanup_exec: list[str] | None = None
    builds_dir: str | None = None
    cache_dir: str | None = None
    shell: str = "bash"
    graceful_kill_timeout: float = DEFAULT_GRACEFUL_KILL_TIMEOUT
    force_kill_timeout: float = DEFAULT_FORCE_KILL_TIMEOUT
    config_exec_timeout: float = DEFAULT_EXEC_TIMEOUT
    prepare_exec_timeout: float = DEFAULT_EXEC_TIMEOUT
    cleanup_exec_timeout: float = DEFAULT_EXEC_TIMEOUT
    # Pause between config+prepare attempts (PreparationRetryInterval, 3 s in the runner).
    retry_delay: float = 3.0
    # Pause before retrying get_sources / restore_cache / download_artifacts: it starts here
    # and doubles up to the maximum.
    stage_retry_delay: float = 1.0
    stage_retry_max_delay: float = 5.0
    # The default RUNNER_AFTER_SCRIPT_TIMEOUT and how long the runner waits for the stages to
    # wind down after the job context ended.
    after_script_timeout: float = DEFAULT_AFTER_SCRIPT_TIMEOUT
    build_finish_timeout: float = WAIT_FOR_BUILD_FINISH_TIMEOUT
    # [[runners]] environment = ["K=V"]: they become job variables.
    environment: list[str] = field(default_factory=list)
    runner_id: int = 1
    name: str = "nspawn-runner-emulator"
    short_token: str = "t3stT0k3"
    system_id: str = "s_0123456789ab"
    server_url: str = "https://gitlab.example.com"
    pre_get_sources_script: str = ""
    post_get_sources_script: str = ""
    pre_build_script: str = ""
    post_build_script: str = ""
    # config.toml feature flags; they win over FF_* job variables.
    feature_flags: dict[str, bool] = field(default_factory=dict)
    # The runner process' own environment: None means os.environ. extra_process_env is laid
    # over it (for example PATH with a gitlab-runner helper, or settings for a fake driver).
    process_env: Mapping[str, str] | None = None
    extra_process_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Job:
    """A job as GitLab would hand it to the runner."""

    script: list[str]
    job_id: int = 1001
    name: str = "test-job"
    stage: str = "test"
    project_id: int = 42
    project_path: str = "group/project"
    image: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    masked_variables: set[str] = field(default_factory=set)
    raw_variables: set[str] = field(default_factory=set)
    file_variables: dict[str, str] = field(default_factory=dict)
    extra_variables: list[JobVariable] = field(default_factory=list)
    # Further steps, in order: {"release": [...]} is sent as stage step_release.
    extra_steps: dict[str, list[str]] = field(default_factory=dict)
    after_script: list[str] | None = None
    cache: list[CacheSpec] = field(default_factory=list)
    artifacts: list[ArtifactSpec] = field(default_factory=list)
    services: list[ServiceSpec] = field(default_factory=list)
    # GIT_STRATEGY as a job variable. "none" by default: no git server is reachable. None
    # leaves it unset (the runner then uses "fetch").
    git_strategy: str | None = "none"
    git_depth: int = 20
    ref: str = "main"
    sha: str = "5a8ba4d1f3b1e1a9c0d7e6f5a4b3c2d1e0f9a8b7"
    before_sha: str = "0000000000000000000000000000000000000000"
    pipeline_id: int = 777
    timeout: int = 3600
    # RUNNER_SCRIPT_TIMEOUT / RUNNER_AFTER_SCRIPT_TIMEOUT as Go durations ("5s", "1m").
    script_timeout: str | None = None
    after_script_timeout: str | None = None
    concurrent_id: int = 0
    concurrent_project_id: int = 0
    token: str = "glcbt-64_FAKEjobTOKEN0123456789abcdefXYZ"


@dataclass
class CallRecord:
    """One call of a driver executable."""

    kind: str  # config | prepare | run | cleanup
    stage: str  # the kind, or for run the stage name the driver got
    argv: list[str]
    attempt: int
    tempdir: str
    started: float  # time.monotonic()
    duration: float = 0.0
    exit_code: int | None = None  # None: not started, or the runner gave up waiting
    signal: int | None = None  # the signal the process died of
    signals_sent: list[str] = field(default_factory=list)
    error: str | None = None  # the runner-side error this call produced
    script: str | None = None  # run: the script's content
    script_path: str | None = None
    output: bytearray = field(default_factory=bytearray, repr=False)  # raw, everything it wrote

    @property
    def output_text(self) -> str:
        return self.output.decode("utf-8", "replace")


@dataclass
class JobResult:
    """What came of one job."""

    status: JobStatus
    failure_reason: str | None
    exit_code: int | None  # a script failure's exit code
    error: str | None
    log: str  # the job log as GitLab shows it (masked)
    raw_log: str  # the same without masking
    runner_log: str  # the runner's own log: cleanup output and internal notes
    calls: list[CallRecord]
    tempdirs: list[str]
    duration: float
    masked_values: list[str] = field(default_factory=list)

    @property
    def tempdir(self) -> str | None:
        """The temp dir of the last config+prepare attempt."""
        return self.tempdirs[-1] if self.tempdirs else None

    @property
    def plain_log(self) -> str:
        return strip_ansi(self.log)

    @property
    def stages(self) -> list[str]:
        """Every call in order: config, prepare, run stage names, cleanup."""
        return [c.stage for c in self.calls]

    @property
    def run_stages(self) -> list[str]:
        return [c.stage for c in self.calls if c.kind == "run"]

    def call_summary(self) -> list[tuple[str, int | None, float]]:
        return [(c.stage, c.exit_code, c.duration) for c in self.calls]

    def calls_of(self, stage: str) -> list[CallRecord]:
        return [c for c in self.calls if c.stage == stage]


# --------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Contexts (a small stand-in for Go's context.Context)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Config stage output
# --------------------------------------------------------------------------------------------


class ConfigParseError(ValueError):
    pass


@dataclass
class ConfigOutput:
    """The config stage's JSON, as ``api.ConfigExecOutput`` (None = key absent or null)."""

    builds_dir: str | None = None
    cache_dir: str | None = None
    builds_dir_is_shared: bool | None = None
    hostname: str | None = None
    driver_name: str | None = None
    driver_version: str | None = None
    has_driver: bool = False
    job_env: dict[str, str] | None = None
    shell: str | None = None


def _reject_constant(name: str) -> object:
    raise ConfigParseError(f"invalid character '{name[0]}' looking for beginning of value")


def _go_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _pairs(value: object) -> list[tuple[str, object]] | None:
    if isinstance(value, _Obj):
        return value.pairs
    return None


class _Obj:
    """A JSON object keeping its key order and duplicates (Go applies them in order)."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs


def parse_config_output(data: bytes) -> ConfigOutput | None:
    """Parse config_exec's stdout like the runner: 0 bytes -> None (no change); otherwise one
    JSON value (``json.Unmarshal`` rules) or ConfigParseError."""
    if len(data) == 0:
        return None
    text = data.decode("utf-8", "replace")
    try:
        value = json.loads(text, object_pairs_hook=_Obj, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        if not text.strip():
            raise ConfigParseError("unexpected end of JSON input") from exc
        raise ConfigParseError(str(exc)) from exc
    out = ConfigOutput()
    if value is None:
        return out
    pairs = _pairs(value)
    if pairs is None:
        raise ConfigParseError(f"json: cannot unmarshal {_go_type(value)} into Go value of "
                               "type custom.ConfigExecOutput")

    def want_str(key: str, item: object) -> str | None:
        if item is None or isinstance(item, str):
            return item
        raise ConfigParseError(f"json: cannot unmarshal {_go_type(item)} into Go struct field "
                               f"ConfigExecOutput.{key} of type string")

    for raw_key, item in pairs:
        key = raw_key.casefold()
        if key in ("builds_dir", "cache_dir", "hostname", "shell"):
            text_value = want_str(key, item)
            if text_value is not None:
                setattr(out, key, text_value)
        elif key == "builds_dir_is_shared":
            if item is not None and not isinstance(item, bool):
                raise ConfigParseError(f"json: cannot unmarshal {_go_type(item)} into Go struct "
                                       "field ConfigExecOutput.builds_dir_is_shared of type bool")
            if item is not None:
                out.builds_dir_is_shared = item
        elif key == "driver":
            if item is None:
                continue
            driver = _pairs(item)
            if driver is None:
                raise ConfigParseError(f"json: cannot unmarshal {_go_type(item)} into Go struct "
                                       "field ConfigExecOutput.driver of type api.DriverInfo")
            out.has_driver = True
            for dkey, dval in driver:
                if dkey.casefold() == "name":
                    name = want_str("driver.name", dval)
                    out.driver_name = out.driver_name if name is None else name
                elif dkey.casefold() == "version":
                    version = want_str("driver.version", dval)
                    out.driver_version = out.driver_version if version is None else version
        elif key == "job_env":
            if item is None:
                continue
            env = _pairs(item)
            if env is None:
                raise ConfigParseError(f"json: cannot unmarshal {_go_type(item)} into Go struct "
                                       "field ConfigExecOutput.job_env of type map[string]string")
            out.job_env = out.job_env if out.job_env is not None else {}
            for ekey, evalue in env:
                if evalue is not None and not isinstance(evalue, str):
                    raise ConfigParseError(
                        f"json: cannot unmarshal {_go_type(evalue)} into Go struct field "
                        f"ConfigExecOutput.job_env of type string")
                out.job_env[ekey] = evalue or ""
    return out


# --------------------------------------------------------------------------------------------
# Script writer (shells/bash.go)
# --------------------------------------------------------------------------------------------


class _BashWriter:
    def __init__(self, temporary_path: str, shell: str, set_permissions_before_cleanup: bool
                 ) -> None:
        self.temporary_path = temporary_path
        self.shell = shell
        self.set_permissions = set_permissions_before_cleanup
        self._lines: list[str] = []
        self._indent = 0

    def line(self, text: str) -> None:
        self._lines.append("  " * self._indent + text + "\n")

    def command(self, cmd: str, *args: str) -> None:
        self.line(" ".join([shell_escape(cmd), *(shell_escape(a) for a in args)]))

    def command_arg_expand(self, cmd: str, *args: str) -> None:
        self.line(" ".join([shell_escape(cmd), *(f'"{a}"' for a in args)]))

    def tmp_file(self, name: str) -> str:
        return go_path_join(self.temporary_path, name)

    def variable(self, var: JobVariable) -> None:
        if var.file:
            path = self.tmp_file(var.key)
            self.line(f"mkdir -p {go_quote(self.temporary_path)}")
            self.line(f"printf '%s' {shell_escape(var.value)} > {go_quote(path)}")
            self.line(f"export {shell_escape(var.key)}={go_quote(path)}")
        else:
            self.line(f"export {shell_escape(var.key)}={shell_escape(var.value)}")

    def source_env(self, path: str) -> None:
        self.line(f"mkdir -p {go_quote(self.temporary_path)}")
        self.line(f"touch {go_quote(path)}")
        self.line(f'while read -r line; do export "$line"; done < {go_quote(path)}')

    def if_directory(self, path: str) -> None:
        self.line(f"if [ -d {go_quote(path)} ]; then")
        self._indent += 1

    def if_file(self, path: str) -> None:
        self.line(f"if [ -e {go_quote(path)} ]; then")
        self._indent += 1

    def if_cmd(self, cmd: str, *args: str) -> None:
        cmdline = " ".join([shell_escape(cmd), *(shell_escape(a) for a in args)])
        self.line(f"if {cmdline} >/dev/null 2>&1; then")
        self._indent += 1

    def if_cmd_with_output(self, cmd: str, *args: str) -> None:
        cmdline = " ".join([shell_escape(cmd), *(shell_escape(a) for a in args)])
        self.line(f"if {cmdline}; then")
        self._indent += 1

    def else_(self) -> None:
        self._indent -= 1
        self.line("else")
        self._indent += 1

    def end_if(self) -> None:
        self._indent -= 1
        self.line("fi")

    def cd(self, path: str) -> None:
        self.command("cd", path)

    def mkdir(self, path: str) -> None:
        self.command("mkdir", "-p", path)

    def mk_tmp_dir(self, name: str) -> str:
        path = go_path_join(self.temporary_path, name)
        self.mkdir(path)
        return path

    def rm_dir(self, path: str) -> None:
        if self.set_permissions:
            self.if_directory(path)
            self.command("chmod", "-R", "u+rwX", path)
            self.end_if()
        self.command("rm", "-r", "-f", path)

    def rm_file(self, path: str) -> None:
        self.command("rm", "-f", path)

    def rm_files_recursive(self, path: str, name: str) -> None:
        self.if_directory(path)
        self.line(f"find {go_quote(path)} -name {go_quote(name)} -type f -exec rm -f {{}} +")
        self.end_if()

    def notice(self, text: str) -> None:
        self.line("echo " + shell_escape(ANSI_BOLD_GREEN + text + ANSI_RESET))

    def warning(self, text: str) -> None:
        self.line("echo " + shell_escape(ANSI_YELLOW + text + ANSI_RESET))

    def empty_line(self) -> None:
        self.line("echo")

    def body(self) -> str:
        return "".join(self._lines)

    def finish(self, trace: bool) -> str:
        """The 19.1+ bash script format (protocol §4)."""
        out = []
        if self.shell:
            out.append(f"#!/usr/bin/env {self.shell}\n\n")
        out.append("trap 'exit 1' TERM\n\n")
        if trace:
            out.append("set -o xtrace\n")
        out.append('case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit\n')
        out.append("set +o noclobber\n")
        out.append(f"(trap 'exit 1' TERM; eval {shell_escape(self.body())}) < /dev/null\n")
        out.append("exit 0\n")
        return "".join(out)


# --------------------------------------------------------------------------------------------
# Job payload and variables
# --------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    """GitLab's CI_*_SLUG: lower-case, non-alphanumerics to '-', at most 63 characters."""
    slug = re.sub(r"[^a-z0-9]", "-", text.lower())[:63]
    return slug.strip("-")


def _server_url_parts(server_url: str) -> tuple[str, str, str]:
    parts = urlsplit(server_url)
    scheme = parts.scheme or "https"
    host = parts.hostname or "gitlab.example.com"
    port = str(parts.port or (443 if scheme == "https" else 80))
    return scheme, host, port


def repo_url(config: RunnerConfig, job: Job) -> str:
    """The repository URL GitLab hands out (with the job token in it)."""
    scheme, _, _ = _server_url_parts(config.server_url)
    netloc = urlsplit(config.server_url).netloc or "gitlab.example.com"
    base_path = urlsplit(config.server_url).path.rstrip("/")
    return f"{scheme}://gitlab-ci-token:{job.token}@{netloc}{base_path}/{job.project_path}.git"


def _server_variables(config: RunnerConfig, job: Job) -> list[JobVariable]:
    """The job's own variables (the ``variables`` of the API payload)."""
    scheme, host, port = _server_url_parts(config.server_url)
    server = config.server_url.rstrip("/")
    namespace, _, project_name = job.project_path.rpartition("/")
    project_url = f"{server}/{job.project_path}"
    predefined: list[tuple[str, str, bool, bool]] = [  # key, value, public, masked
        ("CI_PIPELINE_ID", str(job.pipeline_id), True, False),
        ("CI_PIPELINE_URL", f"{project_url}/-/pipelines/{job.pipeline_id}", True, False),
        ("CI_PIPELINE_SOURCE", "push", True, False),
        ("CI_JOB_ID", str(job.job_id), True, False),
        ("CI_JOB_URL", f"{project_url}/-/jobs/{job.job_id}", True, False),
        ("CI_JOB_TOKEN", job.token, False, True),
        ("CI_JOB_NAME", job.name, True, False),
        ("CI_JOB_NAME_SLUG", _slug(job.name), True, False),
        ("CI_JOB_STAGE", job.stage, True, False),
        ("CI_REGISTRY_USER", "gitlab-ci-token", True, False),
        ("CI_REGISTRY_PASSWORD", job.token, False, True),
        ("CI_REPOSITORY_URL", repo_url(config, job), False, False),
        ("CI_COMMIT_SHA", job.sha, True, False),
        ("CI_COMMIT_SHORT_SHA", job.sha[:8], True, False),
        ("CI_COMMIT_BEFORE_SHA", job.before_sha, True, False),
        ("CI_COMMIT_REF_NAME", job.ref, True, False),
        ("CI_COMMIT_REF_SLUG", _slug(job.ref), True, False),
        ("CI_COMMIT_BRANCH", job.ref, True, False),
        ("CI_COMMIT_REF_PROTECTED", "false", True, False),
        ("CI_DEFAULT_BRANCH", "main", True, False),
        ("CI_PROJECT_ID", str(job.project_id), True, False),
        ("CI_PROJECT_NAME", project_name, True, False),
        ("CI_PROJECT_TITLE", project_name, True, False),
        ("CI_PROJECT_PATH", job.project_path, True, False),
        ("CI_PROJECT_PATH_SLUG", _slug(job.project_path), True, False),
        ("CI_PROJECT_NAMESPACE", namespace, True, False),
        ("CI_PROJECT_ROOT_NAMESPACE", namespace.split("/")[0], True, False),
        ("CI_PROJECT_URL", project_url, True, False),
        ("CI_PROJECT_VISIBILITY", "private", True, False),
        ("CI_SERVER_URL", server, True, False),
        ("CI_SERVER_HOST", host, True, False),
        ("CI_SERVER_PORT", port, True, False),
        ("CI_SERVER_PROTOCOL", scheme, True, False),
        ("CI_SERVER_NAME", "GitLab", True, False),
        ("CI_SERVER_VERSION", "18.6.0", True, False),
        ("CI_API_V4_URL", f"{server}/api/v4", True, False),
        ("CI_RUNNER_ID", str(config.runner_id), True, False),
        ("CI_RUNNER_DESCRIPTION", config.name, True, False),
        ("CI_RUNNER_TAGS", '["nspawn"]', True, False),
        ("GITLAB_USER_ID", "1", True, False),
        ("GITLAB_USER_LOGIN", "tester", True, False),
        ("GITLAB_CI", "true", True, False),
        ("CI", "true", True, False),
        ("CI_NODE_TOTAL", "1", True, False),
        ("CI_CONFIG_PATH", ".gitlab-ci.yml", True, False),
    ]
    out = [JobVariable(k, v, public=p, masked=m) for k, v, p, m in predefined]
    if job.git_strategy is not None:
        out.append(JobVariable("GIT_STRATEGY", job.git_strategy))
    if job.script_timeout is not None:
        out.append(JobVariable("RUNNER_SCRIPT_TIMEOUT", job.script_timeout))
    if job.after_script_timeout is not None:
        out.append(JobVariable("RUNNER_AFTER_SCRIPT_TIMEOUT", job.after_script_timeout))
    for key, value in job.variables.items():
        out.append(JobVariable(key, value, masked=key in job.masked_variables,
                               raw=key in job.raw_variables))
    for key, value in job.file_variables.items():
        out.append(JobVariable(key, value, masked=key in job.masked_variables,
                               raw=key in job.raw_variables, file=True))
    out.extend(job.extra_variables)
    return out


def _job_steps(job: Job) -> list[dict[str, object]]:
    steps: list[dict[str, object]] = [{"name": "script", "script": list(job.script),
                                       "timeout": job.timeout, "when": "on_success",
                                       "allow_failure": False}]
    for name, lines in job.extra_steps.items():
        steps.append({"name": name, "script": list(lines), "timeout": job.timeout,
                      "when": "on_success", "allow_failure": False})
    if job.after_script is not None:
        steps.append({"name": "after_script", "script": list(job.after_script),
                      "timeout": job.timeout, "when": "always", "allow_failure": True})
    return steps


def job_payload(config: RunnerConfig, job: Job) -> dict[str, object]:
    """The job as the GitLab API hands it out (what ``response.json`` holds)."""
    _, _, project_name = job.project_path.rpartition("/")
    return {
        "id": job.job_id,
        "token": job.token,
        "allow_git_fetch": True,
        "job_info": {"name": job.name, "stage": job.stage, "project_id": job.project_id,
                     "project_name": project_name, "project_full_path": job.project_path,
                     "time_in_queue_seconds": 0.5},
        "git_info": {"repo_url": repo_url(config, job), "repo_object_format": "sha1",
                     "ref": job.ref, "sha": job.sha, "before_sha": job.before_sha,
                     "ref_type": "branch",
                     "refspecs": [f"+refs/pipelines/{job.pipeline_id}:refs/pipelines/"
                                  f"{job.pipeline_id}",
                                  f"+refs/heads/{job.ref}:refs/remotes/origin/{job.ref}"],
                     "depth": job.git_depth, "protected": False},
        "runner_info": {"timeout": job.timeout, "runner_session_url": ""},
        "variables": [v.to_json() for v in _server_variables(config, job)],
        "steps": _job_steps(job),
        "image": {"name": job.image or "", "alias": "", "command": None, "entrypoint": None,
                  "ports": None, "variables": None, "pull_policy": None},
        "services": [{"name": s.name, "alias": s.alias, "command": s.command,
                      "entrypoint": s.entrypoint} for s in job.services],
        "artifacts": [{"name": a.name, "untracked": a.untracked, "paths": a.paths,
                       "exclude": a.exclude, "when": a.when, "artifact_type": a.artifact_type,
                       "artifact_format": a.artifact_format, "expire_in": a.expire_in}
                      for a in job.artifacts] or None,
        "cache": [{"key": c.key, "untracked": c.untracked, "policy": c.policy,
                   "paths": c.paths, "when": c.when, "fallback_keys": c.fallback_keys}
                  for c in job.cache],
        "credentials": [],
        "dependencies": [],
        "features": {"trace_sections": True, "token_mask_prefixes": [],
                     "failure_reasons": ["unknown_failure", "script_failure",
                                         "runner_system_failure", "job_execution_timeout"]},
        "secrets": None,
        "hooks": None,
    }


def _sanitize_cache_key(key: str) -> tuple[str, str]:
    """shells.sanitizeCacheKey: (key, warning)."""
    if key == "":
        return "", ""
    fixed = key.replace("%2e", ".").replace("%2E", ".").replace("%2f", "/").replace("%2F", "/")
    cleaned = go_path_join("/", fixed.replace("\\", "/"))
    result = ""
    while cleaned:
        directory, base = posixpath.split(cleaned)
        base = base.rstrip()
        if base == "":
            cleaned = directory[:-1] if directory.endswith("/") else ""
            continue
        result = go_path_join(directory[1:], base)
        break
    if result == "":
        return "", f"cache key {go_quote(key)} could not be sanitized"
    if result != key:
        return result, f"cache key {go_quote(key)} sanitized to {go_quote(result)}"
    return result, ""


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    git_strategy: str
    get_sources_attempts: str
    restore_cache_attempts: str
    artifact_download_attempts: str
    cache_request_timeout: int
    after_script_ignore_errors: bool
    debug_trace: bool
    git_checkout: bool
    lfs_skip_smudge: bool
    clean_flags: list[str]
    fetch_flags: list[str]
    errors: list[str]


class _Executor:
    """One custom executor instance (one config+prepare attempt and its cleanup)."""

    def __init__(self, build: _Build, attempt: int) -> None:
        self.build = build
        self.attempt = attempt
        config = build.config
        self.builds_dir = config.builds_dir or ""
        self.cache_dir = config.cache_dir or ""
        self.shared = False
        self.shell = config.shell
        self.tempdir: str | None = None
        self.response_file = ""
        self.job_env: dict[str, str] = {}
        self.driver_name: str | None = None
        self.driver_version: str | None = None

    # -- calls ---------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        assert self.tempdir is not None
        config = self.build.config
        env = dict(os.environ if config.process_env is None else config.process_env)
        env.update(config.extra_process_env)
        env.update({
            "TMPDIR": self.tempdir,
            "BUILD_FAILURE_EXIT_CODE": str(BUILD_FAILURE_EXIT_CODE),
            "SYSTEM_FAILURE_EXIT_CODE": str(SYSTEM_FAILURE_EXIT_CODE),
            "BUILD_EXIT_CODE_FILE": os.path.join(self.tempdir, "build_exit_code"),
            "JOB_RESPONSE_FILE": self.response_file,
        })
        env.update(self.job_env)
        for var in [*self.build.all_variables(), self.build.services_variable()]:
            key = f"CUSTOM_ENV_{var.key}"
            if "=" in key or "\0" in key or "\0" in var.value:
                continue
            env[key] = var.value
        return env

    def call(self, kind: str, stage: str, argv: list[str], ctx: _Ctx, stdout: _Sink,
             stderr: _Sink | None, script: str | None = None,
             script_path: str | None = None) -> None:
        """Run one driver call to completion; raise the runner's error for its outcome."""
        assert self.tempdir is not None
        build = self.build
        config = build.config
        record = CallRecord(kind=kind, stage=stage, argv=list(argv), attempt=self.attempt,
                            tempdir=self.tempdir, started=time.monotonic(), script=script,
                            script_path=script_path)
        build.add_call(record)
        own = _RecordSink(record.output)
        out_sink = _Tee(stdout, own)
        err_sink = None if stderr is None else _Tee(stderr, own)
        exit_code_file = os.path.join(self.tempdir, "build_exit_code")
        outcome = _run_process(argv, self._env(), self.tempdir, ctx, out_sink, err_sink,
                               config.graceful_kill_timeout, config.force_kill_timeout, record)
        record.duration = time.monotonic() - record.started
        if outcome.returncode is not None:
            record.exit_code = outcome.returncode if outcome.returncode >= 0 else -1
            record.signal = -outcome.returncode if outcome.returncode < 0 else None
        error: _Err | None
        if outcome.start_error is not None:
            error = _Err(outcome.start_error)
        elif outcome.kill_error is not None:
            record.exit_code = None
            error = _Err(outcome.kill_error)
        else:
            assert outcome.returncode is not None
            error = map_exit(outcome.returncode, exit_code_file)
        build.runner_log.log("debug", "driver call finished", stage=stage,
                             exit_code=record.exit_code, duration=f"{record.duration:.3f}s")
        if error is not None:
            record.error = str(error)
            raise error

    # -- Prepare (custom.go) ------------------------------------------------------------

    def prepare(self, job_ctx: _Ctx) -> None:
        build = self.build
        config = build.config
        if not config.run_exec:
            raise _BuildError("custom executor is missing RunExec", CONFIGURATION_ERROR)
        self.tempdir = tempfile.mkdtemp(prefix="custom-executor")
        build.tempdirs.append(self.tempdir)
        self.response_file = os.path.join(self.tempdir, "response.json")
        fd = os.open(self.response_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(go_json_dumps(job_payload(config, build.job)))

        if config.config_exec:
            ctx = job_ctx.child(_positive(config.config_exec_timeout, DEFAULT_EXEC_TIMEOUT))
            buf = _Buffer()
            build.stage_started("config")
            self.call("config", "config", list(config.config_exec), ctx, buf, build.log)
            try:
                parsed = parse_config_output(bytes(buf.data))
            except ConfigParseError as exc:
                raise _Err(f"error while parsing JSON output: {exc}") from exc
            if parsed is not None:
                self._inject(parsed)

        if self.driver_name is None:
            build.log.println("Using Custom executor...")
        elif self.driver_version is None:
            build.log.println(f"Using Custom executor with driver {self.driver_name}...")
        else:
            build.log.println(f"Using Custom executor with driver {self.driver_name} "
                              f"{self.driver_version}...")

        build.start_build(self.builds_dir, self.cache_dir, self.shared)
        if self.shell not in ("bash", "sh"):
            raise _Err(f"shell {self.shell!r} is not supported by the emulator "
                       "(only bash and sh)")

        if not config.prepare_exec:
            return
        ctx = job_ctx.child(_positive(config.prepare_exec_timeout, DEFAULT_EXEC_TIMEOUT))
        build.stage_started("prepare")
        self.call("prepare", "prepare", list(config.prepare_exec), ctx, build.log, None)

    def _inject(self, parsed: ConfigOutput) -> None:
        if parsed.hostname is not None:
            self.build.hostname = parsed.hostname
        if parsed.builds_dir is not None:
            self.builds_dir = parsed.builds_dir
        if parsed.cache_dir is not None:
            self.cache_dir = parsed.cache_dir
        if parsed.builds_dir_is_shared is not None:
            self.shared = parsed.builds_dir_is_shared
        if parsed.has_driver:
            self.driver_name = parsed.driver_name
            self.driver_version = parsed.driver_version
        if parsed.job_env is not None:
            self.job_env = dict(parsed.job_env)
        if parsed.shell is not None:
            self.shell = parsed.shell

    # -- Run ---------------------------------------------------------------------------

    def run(self, stage: str, script: str, ctx: _Ctx) -> None:
        assert self.tempdir is not None
        build = self.build
        script_dir = tempfile.mkdtemp(prefix="script", dir=self.tempdir)
        script_path = os.path.join(script_dir, "script")
        fd = os.open(script_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(script)
        os.chmod(script_path, 0o700)
        if stage == "step_script":
            build.log.warning("Starting with version 17.0 the 'build_script' stage will be "
                              "replaced with 'step_script': "
                              "https://gitlab.com/groups/gitlab-org/-/epics/6112")
            stage = "build_script"
        argv = [*build.config.run_exec, script_path, stage]
        build.stage_started(stage)
        self.call("run", stage, argv, ctx, build.log, None, script=script,
                  script_path=script_path)

    # -- Cleanup -----------------------------------------------------------------------

    def cleanup(self) -> None:
        build = self.build
        config = build.config
        if not config.run_exec:
            build.log.warning("custom executor is missing RunExec")
            return
        if self.tempdir is None:
            return
        try:
            if config.cleanup_exec:
                ctx = _Ctx(None, _positive(config.cleanup_exec_timeout, DEFAULT_EXEC_TIMEOUT))
                out = _LineLogger(build.runner_log, "debug", "out")
                err = _LineLogger(build.runner_log, "warning", "err")
                build.stage_started("cleanup")
                try:
                    self.call("cleanup", "cleanup", list(config.cleanup_exec), ctx, out, err)
                except _Err as exc:
                    build.log.warning(f"Cleanup script failed: {exc}")
                finally:
                    out.close()
                    err.close()
        finally:
            shutil.rmtree(self.tempdir, ignore_errors=True)


def _lookup_in(variables: Sequence[JobVariable]) -> Callable[[str], str]:
    """JobVariables.Get: the last definition wins; "$" is itself, shell specials are empty."""

    def lookup(name: str) -> str:
        if name == "$":
            return "$"
        if name in ("*", "#", "@", "!", "?") or name.isdigit():
            return ""
        for var in reversed(variables):
            if var.key == name:
                return var.value
        return ""

    return lookup


def _positive(value: float, default: float) -> float:
    return value if value > 0 else default


class _Build:
    """common.Build for one job: variables, directories, stages, results."""

    def __init__(self, config: RunnerConfig, job: Job, run: JobRun) -> None:
        self.config = config
        self.job = job
        self.run_handle = run
        self.log = run.job_log
        self.runner_log = run.runner_log
        self.calls: list[CallRecord] = []
        self.tempdirs: list[str] = []
        self._calls_lock = threading.Lock()
        self.root_dir = ""
        self.build_dir = ""
        self.cache_dir = ""
        self.hostname = ""
        self.shell = config.shell
        self.job_status = "running"
        self.server_vars = _server_variables(config, job)
        self.feature_flags = self._resolve_feature_flags()
        self.settings = self._settings()
        self.log.secrets = list(dict.fromkeys(v.value for v in self.all_variables()
                                              if v.masked and v.value))

    # -- variables ---------------------------------------------------------------------

    def _resolve_feature_flags(self) -> dict[str, bool]:
        flags = dict(FEATURE_FLAGS)
        for var in self.server_vars:
            if var.key in flags:
                parsed = go_bool(var.value)
                if parsed is not None:
                    flags[var.key] = parsed
        flags.update({k: v for k, v in self.config.feature_flags.items() if k in flags})
        return flags

    def ff(self, name: str) -> bool:
        return self.feature_flags.get(name, False)

    def all_variables(self) -> list[JobVariable]:
        """Build.GetAllVariables(), expanded."""
        config = self.config
        job = self.job
        variables = [JobVariable(k, "true" if v else "false", internal=True)
                     for k, v in self.feature_flags.items()]
        if job.image:
            variables.append(JobVariable("CI_JOB_IMAGE", job.image, internal=True))
        variables.append(JobVariable("CI_RUNNER_SHORT_TOKEN", config.short_token,
                                     internal=True))
        for entry in config.environment:
            key, sep, value = entry.partition("=")
            if sep:
                variables.append(JobVariable(key, value, internal=True))
        variables += [
            JobVariable("CI_BUILDS_DIR", self.root_dir, internal=True),
            JobVariable("CI_PROJECT_DIR", self.build_dir, internal=True),
            JobVariable("CI_CONCURRENT_ID", str(job.concurrent_id), internal=True),
            JobVariable("CI_CONCURRENT_PROJECT_ID", str(job.concurrent_project_id),
                        internal=True),
            JobVariable("CI_SERVER", "yes", internal=True),
            JobVariable("CI_JOB_STATUS", "running", internal=True),
            JobVariable("CI_JOB_TIMEOUT", str(job.timeout), internal=True),
        ]
        variables += [v for v in self.server_vars if v.key not in FEATURE_FLAGS]
        variables += [
            JobVariable("CI_SHARED_ENVIRONMENT", "true", internal=True),
            JobVariable("CI_RUNNER_VERSION", RUNNER_VERSION, internal=True),
            JobVariable("CI_RUNNER_REVISION", RUNNER_REVISION, internal=True),
            JobVariable("CI_RUNNER_EXECUTABLE_ARCH", f"linux/{RUNNER_ARCH}", internal=True),
            JobVariable("RUNNER_TEMP_PROJECT_DIR", self.build_dir + ".tmp", internal=True),
        ]

        lookup = _lookup_in(variables)
        expanded = [v if v.raw else JobVariable(v.key, go_expand(v.value, lookup), v.public,
                                                v.internal, v.masked, v.file, v.raw)
                    for v in variables]
        if self.job_status != "running":
            expanded = [JobVariable("CI_JOB_STATUS", self.job_status, internal=True)
                        if v.key == "CI_JOB_STATUS" else v for v in expanded]
        return expanded

    def value(self, key: str) -> str:
        for var in reversed(self.all_variables()):
            if var.key == key:
                return var.value
        return ""

    def has(self, key: str) -> bool:
        return any(v.key == key for v in self.all_variables())

    def expand(self, text: str) -> str:
        return go_expand(text, _lookup_in(self.all_variables()))

    def services_variable(self) -> JobVariable:
        if not self.job.services:
            return JobVariable("CI_JOB_SERVICES", "")
        services = [{"name": s.name, "alias": s.alias, "entrypoint": s.entrypoint,
                     "command": s.command} for s in self.job.services]
        return JobVariable("CI_JOB_SERVICES", go_json_dumps(services).rstrip("\n"))

    def _settings(self) -> _Settings:
        errors: list[str] = []
        strategy = self.value("GIT_STRATEGY")
        if strategy not in ("clone", "fetch", "none", "empty"):
            if strategy:
                errors.append(f"invalid GIT_STRATEGY {strategy!r}")
            strategy = "fetch"
        cache_timeout = DEFAULT_CACHE_REQUEST_TIMEOUT
        raw_timeout = self.value("CACHE_REQUEST_TIMEOUT")
        if raw_timeout:
            parsed = go_atoi(raw_timeout)
            if parsed is None:
                errors.append(f"invalid CACHE_REQUEST_TIMEOUT {raw_timeout!r}")
            else:
                cache_timeout = parsed
        ignore = go_bool(self.value("AFTER_SCRIPT_IGNORE_ERRORS") or "true")
        checkout = go_bool(self.value("GIT_CHECKOUT") or "true")
        clean_flags = (self.value("GIT_CLEAN_FLAGS") or "-ffdx").split()
        fetch_flags = (self.value("GIT_FETCH_EXTRA_FLAGS") or "--prune --quiet").split()
        return _Settings(
            git_strategy=strategy,
            get_sources_attempts=self.value("GET_SOURCES_ATTEMPTS"),
            restore_cache_attempts=self.value("RESTORE_CACHE_ATTEMPTS"),
            artifact_download_attempts=self.value("ARTIFACT_DOWNLOAD_ATTEMPTS"),
            cache_request_timeout=cache_timeout,
            after_script_ignore_errors=True if ignore is None else ignore,
            debug_trace=bool(go_bool(self.value("CI_DEBUG_TRACE") or "false")),
            git_checkout=True if checkout is None else checkout,
            lfs_skip_smudge=bool(go_bool(self.value("GIT_LFS_SKIP_SMUDGE") or "false")),
            clean_flags=[] if clean_flags == ["none"] else clean_flags,
            fetch_flags=[] if fetch_flags == ["none"] else fetch_flags,
            errors=errors,
        )

    def attempts(self, raw: str, stage: str) -> int:
        if not raw:
            return 1
        value = go_atoi(raw)
        if value is None:
            self.log.warning(f"invalid number of attempts {raw!r} for stage {stage}, using 1")
            return 1
        return value

    # -- directories (build.go StartBuild) ------------------------------------------------

    def project_unique_dir(self, shared: bool) -> str:
        parts = urlsplit(repo_url(self.config, self.job))
        slug = posixpath.normpath(parts.path.removesuffix(".git")).lstrip("/")
        if not parts.hostname or slug in ("", ".") or ".." in slug:
            slug = f"project-{self.job.project_id}"
        if shared:
            slug = go_path_join(self.config.short_token, str(self.job.concurrent_project_id),
                                slug)
        if self.settings.git_strategy == "empty":
            slug += "-empty"
        return slug

    def start_build(self, root_dir: str, cache_dir: str, shared: bool) -> None:
        if root_dir == "":
            raise _BuildError("the builds_dir is not configured", CONFIGURATION_ERROR)
        if cache_dir == "":
            raise _BuildError("the cache_dir is not configured", CONFIGURATION_ERROR)
        self.root_dir = root_dir
        self.cache_dir = go_path_join(cache_dir, self.project_unique_dir(False))
        self.build_dir = go_path_join(root_dir, self.project_unique_dir(shared))

    @property
    def tmp_project_dir(self) -> str:
        return self.build_dir + ".tmp"

    # -- bookkeeping -------------------------------------------------------------------

    def add_call(self, record: CallRecord) -> None:
        with self._calls_lock:
            self.calls.append(record)

    def stage_started(self, stage: str) -> None:
        self.run_handle._stage_started(stage)

    # -- scripts (shells/abstract.go) -----------------------------------------------------

    def writer(self) -> _BashWriter:
        return _BashWriter(self.tmp_project_dir, self.shell,
                           self.ff("FF_SET_PERMISSIONS_BEFORE_CLEANUP"))

    def _write_exports(self, w: _BashWriter) -> None:
        for var in self.all_variables():
            w.variable(var)
        env_file = w.tmp_file("gitlab_runner_env")
        w.variable(JobVariable("GITLAB_ENV", env_file))
        w.source_env(env_file)

    def _write_commands(self, w: _BashWriter, commands: Iterable[str]) -> None:
        for raw in commands:
            command = raw.strip()
            if command == "":
                w.empty_line()
            elif "\n" in command:
                w.notice(f"$ {command.split(chr(10), 1)[0]} # collapsed multi-line command")
            else:
                w.notice(f"$ {command}")
            w.line(command)

    def _change_files_ownership(self, w: _BashWriter, *dirs: str) -> None:
        uid_gid_file = f"{self.root_dir}/.gitlab-build-uid-gid"
        w.if_file(uid_gid_file)
        for d in dirs:
            if not d.strip():
                continue
            w.if_directory(d)
            w.line(f"chown -R \"$(stat -c '%u:%g' '{uid_gid_file}')\" '{d}'")
            w.end_if()
        w.end_if()

    def _remote_urls(self) -> tuple[str, str]:
        with_creds = repo_url(self.config, self.job)
        parts = urlsplit(with_creds)
        netloc = parts.netloc.rpartition("@")[2]
        return with_creds, parts._replace(netloc=netloc).geturl()

    def _write_git_cleanup(self, w: _BashWriter) -> None:
        git_dir = go_path_join(self.build_dir, ".git")
        for name in ("index.lock", "shallow.lock", "HEAD.lock", "hooks/post-checkout",
                     "config.lock"):
            w.rm_file(go_path_join(git_dir, name))
        w.rm_files_recursive(go_path_join(git_dir, "refs"), "*.lock")
        if self.settings.git_strategy != "none":
            for d in (w.tmp_file("git-template"), git_dir):
                w.rm_file(go_path_join(d, "config"))
                w.rm_dir(go_path_join(d, "hooks"))

    def _write_git_fetch(self, w: _BashWriter, clone: bool) -> None:
        """Fetch/clone as the runner writes it (a real git server is needed to succeed)."""
        project_dir = self.build_dir
        self._write_git_cleanup(w)
        template_dir = w.mk_tmp_dir("git-template")
        template_file = go_path_join(template_dir, "config")
        ext_config = w.tmp_file(".gitlab-runner.ext.conf")
        for key, value in (("init.defaultBranch", "none"), ("fetch.recurseSubmodules", "false"),
                           ("credential.interactive", "never"), ("gc.autoDetach", "false")):
            w.command("git", "config", "-f", template_file, key, value)
        w.rm_file(ext_config)
        if self.ff("FF_USE_GIT_BUNDLE_URIS"):
            w.command_arg_expand("git", "config", "-f", ext_config, "transfer.bundleURI", "true")
        with_creds, without_creds = self._remote_urls()
        w.command_arg_expand("git", "config", "--file", ext_config, "--replace-all",
                             f"url.{with_creds}.insteadOf", without_creds,
                             "^" + re.escape(without_creds) + "$")
        w.command_arg_expand("git", "config", "--file", template_file, "--replace-all",
                             "include.path", ext_config, r"\.gitlab-runner\.ext\.conf$")
        w.line(f"export GLR_EXT_GIT_CONFIG_PATH={shell_escape(ext_config)}")
        if clone:
            w.rm_dir(project_dir)
        depth = self.job.git_depth
        w.notice(f"Fetching changes with git depth set to {depth}..." if depth > 0
                 else "Fetching changes...")
        w.command("git", "init", project_dir, "--template", template_dir)
        w.cd(project_dir)
        w.if_cmd("git", "remote", "add", "origin", without_creds)
        w.notice("Created fresh repository.")
        w.else_()
        w.command("git", "remote", "set-url", "origin", without_creds)
        w.command_arg_expand("git", "config", "--file", ".git/config", "--replace-all",
                             "include.path", "$GLR_EXT_GIT_CONFIG_PATH",
                             r"\.gitlab-runner\.ext\.conf$")
        w.end_if()
        fetch = ["-c", f"http.userAgent=gitlab-runner {RUNNER_VERSION} linux/{RUNNER_ARCH}",
                 "fetch", "origin", "--no-recurse-submodules",
                 f"+refs/pipelines/{self.job.pipeline_id}:refs/pipelines/{self.job.pipeline_id}",
                 f"+refs/heads/{self.job.ref}:refs/remotes/origin/{self.job.ref}"]
        if depth > 0:
            fetch += ["--depth", str(depth)]
        fetch += self.settings.fetch_flags
        if depth > 0:
            w.command("git", *fetch)
        else:
            w.if_file(".git/shallow")
            w.command("git", *fetch, "--unshallow")
            w.else_()
            w.command("git", *fetch)
            w.end_if()

    def _script_get_sources(self, w: _BashWriter) -> bool:
        strategy = self.settings.git_strategy
        self._write_exports(w)
        w.variable(JobVariable("GIT_TERMINAL_PROMPT", "0"))
        w.variable(JobVariable("GCM_INTERACTIVE", "Never"))
        if strategy not in ("none", "empty") and self.config.pre_get_sources_script:
            self._write_commands(w, [self.config.pre_get_sources_script])
        if not self.settings.lfs_skip_smudge:
            w.variable(JobVariable("GIT_LFS_SKIP_SMUDGE", "1"))
        if strategy in ("fetch", "clone"):
            self._write_git_fetch(w, clone=strategy == "clone")
        elif strategy == "none":
            w.notice("Skipping Git repository setup")
            w.mkdir(self.build_dir)
        else:
            w.notice("Skipping Git repository setup and creating an empty build directory")
            w.rm_dir(self.build_dir)
            w.mkdir(self.build_dir)
        if strategy in ("fetch", "clone") and self.settings.git_checkout:
            w.notice(f"Checking out {self.job.sha[:8]} as detached HEAD "
                     f"(ref is {self.job.ref})...")
            w.command("git", "-c", "submodule.recurse=false", "checkout", "-f", "-q",
                      self.job.sha)
            if self.settings.clean_flags:
                w.command("git", "clean", *self.settings.clean_flags)
            if not self.settings.lfs_skip_smudge:
                w.if_cmd("git", "lfs", "version")
                w.command("git", "lfs", "pull")
                w.empty_line()
                w.end_if()
        else:
            w.notice("Skipping Git checkout")
        w.notice("Skipping Git submodules setup")
        if strategy not in ("none", "empty") and self.config.post_get_sources_script:
            self._write_commands(w, [self.config.post_get_sources_script])
        self._change_files_ownership(w, self.root_dir)
        return False

    def _script_clear_worktree(self, w: _BashWriter) -> bool:
        w.notice("Deleting tracked and untracked files...")
        w.if_directory(self.build_dir)
        w.cd(self.build_dir)
        w.command("git", "rm", "-rf", "--ignore-unmatch", ".")
        w.command("git", "clean", "-ffdx")
        w.end_if()
        return False

    def _cache_file(self, key: str, w: _BashWriter) -> tuple[str, str] | None:
        """(human key, archive path relative to the project dir), or None to skip."""
        raw_key = self.expand(key) if key else go_path_join(self.job.name, self.job.ref)
        human, warning = _sanitize_cache_key(raw_key)
        if warning:
            w.warning(warning)
        if human == "":
            w.notice("Skipping cache extraction due to empty cache key")
            return None
        archive = go_path_join(self.cache_dir, human, "cache.zip")
        if os.path.isabs(archive) != os.path.isabs(self.build_dir):
            w.notice("Skipping cache due to inability to make the cache file path relative "
                     "to the build directory (is the build directory absolute?)")
            return None
        return human, os.path.relpath(archive, self.build_dir)

    def _check_policy(self, spec: CacheSpec, want: str, key: str) -> bool:
        policy = self.expand(spec.policy)
        if policy in ("", "pull-push"):
            return True
        if policy in ("pull", "push"):
            return policy == want
        raise _Err(f"unknown cache policy {policy} for {key}")

    def _write_extract(self, w: _BashWriter, keys: list[tuple[str, str]]) -> None:
        human, archive = keys[0]
        w.notice(f"Checking cache for {human}...")
        w.if_cmd_with_output("gitlab-runner", "cache-extractor", "--file", archive,
                             "--timeout", str(self.settings.cache_request_timeout))
        w.notice("Successfully extracted cache")
        w.else_()
        w.warning("Failed to extract cache")
        if len(keys) > 1:
            self._write_extract(w, keys[1:])
        w.end_if()

    def _script_restore_cache(self, w: _BashWriter) -> bool:
        self._write_exports(w)
        w.cd(self.build_dir)
        skip = True
        for spec in self.job.cache:
            if not spec.paths and not spec.untracked:
                continue
            skip = False
            found = self._cache_file(spec.key, w)
            if found is None:
                continue
            if not self._check_policy(spec, "pull", found[0]):
                w.notice(f"Not downloading cache {found[0]} due to policy")
                continue
            keys = [found]
            for fallback in [*spec.fallback_keys, self.value("CACHE_FALLBACK_KEY")]:
                if not fallback:
                    continue
                if fallback.endswith("-protected") and fallback == self.value(
                        "CACHE_FALLBACK_KEY"):
                    w.warning(f"CACHE_FALLBACK_KEY {go_quote(fallback)} not allowed to end in "
                              f"{go_quote('-protected')}")
                    continue
                extra = self._cache_file(self.expand(fallback), w)
                if extra is not None:
                    keys.append(extra)
            w.if_cmd("gitlab-runner", "--version")
            self._write_extract(w, keys)
            w.else_()
            w.warning("Missing gitlab-runner. Extracting cache is disabled.")
            w.end_if()
        if skip:
            return True
        self._change_files_ownership(w, self.cache_dir, self.root_dir)
        return False

    def _script_archive_cache(self, w: _BashWriter, on_success: bool) -> bool:
        self._write_exports(w)
        w.cd(self.build_dir)
        skip = True
        for spec in self.job.cache:
            when = spec.when or "on_success"
            if not (when == "always" or (when == "on_success") == on_success):
                continue
            args: list[str] = []
            for p in spec.paths:
                args += ["--path", p]
            if spec.untracked:
                args.append("--untracked")
            if not args:
                continue
            skip = False
            found = self._cache_file(spec.key, w)
            if found is None:
                continue
            if not self._check_policy(spec, "push", found[0]):
                w.notice(f"Not uploading cache {found[0]} due to policy")
                continue
            w.if_cmd("gitlab-runner", "--version")
            w.notice(f"Creating cache {found[0]}...")
            w.if_cmd_with_output("gitlab-runner", "cache-archiver", "--file", found[1],
                                 "--timeout", str(self.settings.cache_request_timeout), *args)
            w.notice("Created cache")
            w.else_()
            w.warning("Failed to create cache")
            w.end_if()
            w.else_()
            w.warning("Missing gitlab-runner. Creating cache is disabled.")
            w.end_if()
        return skip

    def _script_upload_artifacts(self, w: _BashWriter, on_success: bool) -> bool:
        if not self.config.server_url:
            return True
        self._write_exports(w)
        w.cd(self.build_dir)
        skip = True
        for art in self.job.artifacts:
            when = art.when or "on_success"
            if not (when == "always" or (when == "on_success") == on_success):
                continue
            paths: list[str] = []
            for p in art.paths:
                paths += ["--path", p]
            for p in art.exclude:
                paths += ["--exclude", p]
            if art.untracked:
                paths.append("--untracked")
            if not paths:
                continue
            skip = False
            args = ["artifacts-uploader", "--url", self.config.server_url, "--token",
                    self.job.token, "--id", str(self.job.job_id), *paths]
            if art.name:
                args += ["--name", art.name]
            if art.expire_in:
                args += ["--expire-in", art.expire_in]
            if art.artifact_format:
                args += ["--artifact-format", art.artifact_format]
            if art.artifact_type:
                args += ["--artifact-type", art.artifact_type]
            w.if_cmd("gitlab-runner", "--version")
            w.notice("Uploading artifacts...")
            w.command("gitlab-runner", *args)
            w.else_()
            w.warning("Missing gitlab-runner. Uploading artifacts is disabled.")
            w.end_if()
        return skip

    def _script_user(self, w: _BashWriter, stage: str) -> bool:
        steps = {f"step_{name.lower()}": lines for name, lines in
                 [("script", self.job.script), *self.job.extra_steps.items()]}
        if stage not in steps:
            return True
        self._write_exports(w)
        w.cd(self.build_dir)
        if self.config.pre_build_script:
            self._write_commands(w, [self.config.pre_build_script])
        self._write_commands(w, steps[stage])
        if self.config.post_build_script:
            self._write_commands(w, [self.config.post_build_script])
        return False

    def _script_after(self, w: _BashWriter) -> bool:
        if not self.job.after_script:
            return True
        self._write_exports(w)
        w.cd(self.build_dir)
        w.notice("Running after script...")
        self._write_commands(w, self.job.after_script)
        return False

    def _script_cleanup(self, w: _BashWriter) -> bool:
        w.rm_file(w.tmp_file("gitlab_runner_env"))
        w.rm_file(w.tmp_file("masking.db"))
        w.rm_file(w.tmp_file(".gitlab-runner.ext.conf"))
        for var in self.all_variables():
            if var.file:
                w.rm_file(w.tmp_file(var.key))
        self._write_git_cleanup(w)
        w.rm_file(go_path_join(self.root_dir, ".gitlab-build-uid-gid"))
        return False

    def generate(self, stage: str) -> tuple[str, bool]:
        """The script for a stage and whether the stage has nothing to do (ErrSkipBuildStage).
        """
        w = self.writer()
        if stage == "prepare_script":
            if self.hostname:
                w.line("echo " + go_quote(f"Running on $(hostname) via {self.hostname}..."))
            else:
                w.line("echo " + go_quote("Running on $(hostname)..."))
            w.rm_file(w.tmp_file("gitlab_runner_env"))
            w.rm_file(w.tmp_file("masking.db"))
            skip = False
        elif stage == "get_sources":
            skip = self._script_get_sources(w)
        elif stage == "clear_worktree":
            skip = self._script_clear_worktree(w)
        elif stage == "restore_cache":
            skip = self._script_restore_cache(w)
        elif stage == "download_artifacts":
            self._write_exports(w)
            w.cd(self.build_dir)
            skip = True  # the emulator's jobs have no dependencies with artifacts
        elif stage == "after_script":
            skip = self._script_after(w)
        elif stage in ("archive_cache", "archive_cache_on_failure"):
            skip = self._script_archive_cache(w, stage == "archive_cache")
        elif stage in ("upload_artifacts_on_success", "upload_artifacts_on_failure"):
            skip = self._script_upload_artifacts(w, stage == "upload_artifacts_on_success")
        elif stage == "cleanup_file_variables":
            skip = self._script_cleanup(w)
        else:
            skip = self._script_user(w, stage)
        return w.finish(self.settings.debug_trace), skip

    # -- stages (build.go) ---------------------------------------------------------------

    def execute_stage(self, ctx: _Ctx, stage: str, ex: _Executor) -> _Err | None:
        reason = ctx.err()
        if reason is not None:
            return _CtxError(reason)
        try:
            script, skip = self.generate(stage)
        except _Err as exc:
            return exc
        if skip and self.ff("FF_SKIP_NOOP_BUILD_STAGES"):
            self.runner_log.log("debug", "Skipping stage (nothing to do)", build_stage=stage)
            return None
        self.log.section_start(stage)
        self.log.println(f"{ANSI_BOLD_CYAN}{self.stage_description(stage)}{ANSI_RESET}")
        error: _Err | None = None
        try:
            ex.run(stage, script, ctx)
        except _Err as exc:
            error = exc
        self.log.section_end(stage)
        if ctx.err() == DEADLINE_EXCEEDED:
            self.log.warning(f"{stage} could not run to completion because the timeout was "
                             "exceeded. For more control over job and script timeouts see: "
                             "https://docs.gitlab.com/ci/runners/configure_runners/"
                             "#set-script-and-after_script-timeouts")
        return error

    @staticmethod
    def stage_description(stage: str) -> str:
        return STAGE_DESCRIPTIONS.get(stage, f"Executing {go_quote(stage)} stage of the job "
                                             "script")

    def attempt_stage(self, ctx: _Ctx, stage: str, ex: _Executor, attempts: int,
                      retry: Callable[[int], _Err | None] | None = None) -> _Err | None:
        if attempts < 1 or attempts > 10:
            return _Err(f"number of attempts out of the range [1, 10] for stage: {stage}")
        delay = self.config.stage_retry_delay
        err: _Err | None = None
        for attempt in range(attempts):
            if retry is not None:
                err = retry(attempt)
                if err is not None:
                    continue
            err = self.execute_stage(ctx, stage, ex)
            if err is None:
                return None
            if attempt == attempts - 1:
                break
            if delay > 0:
                self.log.info(f"Retrying in {go_duration_str(delay)}")
                time.sleep(delay)
                delay = min(delay * 2, self.config.stage_retry_max_delay)
        return err

    def execute_prepare_scripts(self, ctx: _Ctx, ex: _Executor) -> tuple[_Err | None, bool]:
        err = self.execute_stage(ctx, "prepare_script", ex)
        if err is not None:
            return err.wrapped(
                f"prepare environment: {err}. Check "
                "https://docs.gitlab.com/runner/shells/#shell-profile-loading for more "
                "information"), False

        def clear_worktree(attempt: int) -> _Err | None:
            if attempt == 1:
                return self.execute_stage(ctx, "clear_worktree", ex)
            return None

        s = self.settings
        err = self.attempt_stage(ctx, "get_sources", ex,
                                 self.attempts(s.get_sources_attempts, "get_sources"),
                                 clear_worktree)
        if err is None:
            err = self.attempt_stage(ctx, "restore_cache", ex,
                                     self.attempts(s.restore_cache_attempts, "restore_cache"))
        if err is None:
            err = self.attempt_stage(ctx, "download_artifacts", ex,
                                     self.attempts(s.artifact_download_attempts,
                                                   "download_artifacts"))
        return err, True

    def _stage_timeout(self, name: str, default: float, ctx: _Ctx) -> float | None:
        raw = self.value(name)
        result: float | None = default if default > 0 else None
        if raw.strip() == "":
            return result
        parsed = go_parse_duration(raw)
        if parsed is None:
            self.log.warning(f"Ignoring malformed {name} timeout: {raw}")
        elif parsed < 0:
            self.log.warning(f"Ignoring relative {name} timeout: {raw}")
        elif ctx.deadline is not None and parsed > ctx.deadline - time.monotonic():
            self.log.warning(f"{name} timeout: {raw} is longer than job timeout. Setting to job "
                             "timeout")
        elif parsed != 0:
            result = parsed
        return result

    @staticmethod
    def runtime_state(err: _Err | None) -> str:
        if err is None:
            return "success"
        if isinstance(err, _CtxError):
            return "canceled" if err.reason == CANCELED else "timedout"
        if isinstance(err, _BuildError):
            if err.failure_reason == JOB_CANCELED:
                return "canceled"
            if err.failure_reason == JOB_EXECUTION_TIMEOUT:
                return "timedout"
        return "failed"

    def execute_user_scripts(self, ctx: _Ctx, ex: _Executor) -> _Err | None:
        script_timeout = self._stage_timeout("RUNNER_SCRIPT_TIMEOUT", 0, ctx)
        after_timeout = self._stage_timeout("RUNNER_AFTER_SCRIPT_TIMEOUT",
                                            self.config.after_script_timeout, ctx)
        script_ctx = ctx.child(script_timeout)
        self.run_handle._set_cancel_target(script_ctx)
        err: _Err | None = None
        steps = ["script", *self.job.extra_steps]
        for name in steps:
            err = self.execute_stage(script_ctx, f"step_{name.lower()}", ex)
            if err is not None:
                break
        if ctx.err() is None and script_ctx.err() == CANCELED:
            err = _BuildError("canceled", JOB_CANCELED)
            self.log.warning("script canceled externally (UI, API)")
        elif ctx.err() != DEADLINE_EXCEEDED and script_ctx.err() == DEADLINE_EXCEEDED:
            err = _BuildError("script timeout: context deadline exceeded",
                              JOB_EXECUTION_TIMEOUT)
        after_ctx = ctx.child(after_timeout)
        self.job_status = self.runtime_state(err)
        after_err = self.execute_stage(after_ctx, "after_script", ex)
        if after_err is not None and ctx.err() != DEADLINE_EXCEEDED:
            if self.settings.after_script_ignore_errors:
                self.log.warning(f"after_script failed, but job will continue unaffected: "
                                 f"{after_err}")
            elif err is None:
                err = after_err
        return err

    def execute_script(self, ctx: _Ctx, ex: _Executor) -> _Err | None:
        err, cont = self.execute_prepare_scripts(ctx, ex)
        if not cont:
            return err
        if err is None:
            err = self.execute_user_scripts(ctx, ex)
        on_success = err is None
        archive_err = self.execute_stage(
            ctx, "archive_cache" if on_success else "archive_cache_on_failure", ex)
        upload_err = self.execute_stage(
            ctx, "upload_artifacts_on_success" if on_success else "upload_artifacts_on_failure",
            ex)
        cleanup_err = self.execute_stage(ctx, "cleanup_file_variables", ex)
        if cleanup_err is not None:
            self.runner_log.log("warning", "Error while executing file based variables removal "
                                "script", error=str(cleanup_err))
        return err or archive_err or upload_err

    def ctx_error(self, reason: str) -> _BuildError:
        if reason == CANCELED:
            return _BuildError("canceled", JOB_CANCELED)
        return _BuildError(f"execution took longer than {go_duration_str(self.job.timeout)} "
                           "seconds", JOB_EXECUTION_TIMEOUT)

    def run_build(self, job_ctx: _Ctx, ex: _Executor) -> _Err | None:
        """Build.run: the stages in a worker, watched for the job context."""
        run_ctx = job_ctx.child()
        finished = threading.Event()
        box: list[_Err | None] = []

        def worker() -> None:
            try:
                box.append(self.execute_script(run_ctx, ex))
            except Exception as exc:  # a bug in the emulator: surface it as a system failure
                box.append(_Err(f"emulator error: {exc!r}"))
            finally:
                finished.set()

        thread = threading.Thread(target=worker, name="build", daemon=True)
        thread.start()
        while not finished.wait(0.02):
            if job_ctx.err() is not None:
                break
        reason = job_ctx.err()
        if finished.is_set() and reason is None:
            return box[0]
        if reason is None:  # not reachable: the loop only ends on finish or ctx end
            return box[0] if box else None
        run_ctx.cancel()
        if not finished.wait(self.config.build_finish_timeout):
            self.log.warning("Timed out waiting for the build to finish")
        return self.ctx_error(reason)

    def retry_create_executor(self, job_ctx: _Ctx) -> tuple[_Executor | None, _Err | None]:
        err: _Err | None = None
        for attempt in range(1, PREPARATION_RETRIES + 1):
            ex = _Executor(self, attempt)
            try:
                ex.prepare(job_ctx)
                return ex, None
            except _Err as exc:
                err = exc
            ex.cleanup()
            if isinstance(err, _BuildError):
                return None, err
            reason = job_ctx.err()
            if reason is not None:
                return None, self.ctx_error(reason)
            self.log.error(f"Preparation failed: {err}")
            self.log.println(f"Will be retried in {go_duration_str(self.config.retry_delay)} "
                             "...")
            time.sleep(self.config.retry_delay)
        return None, err

    def run(self, job_ctx: _Ctx) -> _Err | None:
        log = self.log
        log.println(f"Running with gitlab-runner {RUNNER_VERSION} ({RUNNER_REVISION})")
        log.println(f"  on {self.config.name} {self.config.short_token}, system ID: "
                    f"{self.config.system_id}")
        for problem in self.settings.errors:
            log.warning(problem)
        log.section_start("prepare_executor")
        log.println(f'{ANSI_BOLD_CYAN}Preparing the "custom" executor{ANSI_RESET}')
        ex, err = self.retry_create_executor(job_ctx)
        log.section_end("prepare_executor")
        if ex is None:
            return err
        try:
            err = self.run_build(job_ctx, ex)
        finally:
            ex.cleanup()
        return err


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _outcome(err: _Err | None) -> tuple[JobStatus, str | None, int | None]:
    if err is None:
        return "success", None, None
    if isinstance(err, _BuildError):
        reason = err.failure_reason
        if reason == JOB_CANCELED:
            return "canceled", reason, None
        if reason == JOB_EXECUTION_TIMEOUT:
            return "timedout", reason, None
        if reason == RUNNER_SYSTEM_FAILURE:
            return "system_failure", reason, None
        return "failed", reason, err.exit_code if reason == SCRIPT_FAILURE else None
    if isinstance(err, _CtxError):
        return ("canceled", JOB_CANCELED, None) if err.reason == CANCELED else (
            "timedout", JOB_EXECUTION_TIMEOUT, None)
    return "system_failure", RUNNER_SYSTEM_FAILURE, None


class JobRun:
    """One job in flight. ``start()`` runs it in a thread; ``cancel()`` is a UI cancel (while
    the steps run only they stop: after_script, *_on_failure, cleanup_file_variables and
    cleanup still run; before the steps it cancels the whole job; after them it does nothing);
    ``abort()`` cancels the whole job context (then only cleanup runs)."""

    def __init__(self, config: RunnerConfig, job: Job, *,
                 live_output: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.job = job
        self.job_log = _JobLog(live_output)
        self.runner_log = _RunnerLog()
        self._lock = threading.Condition()
        self._job_ctx: _Ctx | None = None
        self._cancel_target: _Ctx | None = None
        self._pending: list[str] = []
        self._stage_starts: dict[str, float] = {}
        self._current_stage: str | None = None
        self._thread: threading.Thread | None = None
        self._result: JobResult | None = None
        self._done = threading.Event()

    # -- control --------------------------------------------------------------------------

    def start(self) -> JobRun:
        if self._thread is not None:
            raise RuntimeError("job already started")
        self._thread = threading.Thread(target=self._main, name=f"job-{self.job.job_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def run(self) -> JobResult:
        """Run the job in the calling thread."""
        self._main()
        assert self._result is not None
        return self._result

    def wait(self, timeout: float | None = None) -> JobResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.job.job_id} still running after {timeout} s")
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """A cancel from the UI or API."""
        with self._lock:
            if self._cancel_target is None:
                self._pending.append("cancel")
                return
            target = self._cancel_target
        self.runner_log.log("info", "cancel requested", stage=self._current_stage)
        target.cancel()

    def abort(self) -> None:
        """The job is gone server-side (or the runner is stopping): cancel everything."""
        with self._lock:
            if self._job_ctx is None:
                self._pending.append("abort")
                return
            target = self._job_ctx
        self.runner_log.log("info", "abort requested", stage=self._current_stage)
        target.cancel()

    def schedule(self, action: Literal["cancel", "abort"], stage: str, delay: float) -> None:
        """Cancel or abort ``delay`` seconds after the driver was first called for ``stage``
        (a run stage name such as "build_script", or config/prepare/cleanup)."""
        if stage == "step_script":
            stage = "build_script"

        def waiter() -> None:
            with self._lock:
                while stage not in self._stage_starts and not self._done.is_set():
                    self._lock.wait(0.05)
                if self._done.is_set():
                    return
            if self._done.wait(delay):
                return
            if action == "cancel":
                self.cancel()
            else:
                self.abort()

        threading.Thread(target=waiter, name=f"{action}-at-{stage}", daemon=True).start()

    # -- state ----------------------------------------------------------------------------

    @property
    def current_stage(self) -> str | None:
        return self._current_stage

    def wait_for_stage(self, stage: str, timeout: float) -> bool:
        """Wait until the driver was called for ``stage``; False on timeout or job end."""
        end = time.monotonic() + timeout
        with self._lock:
            while stage not in self._stage_starts:
                left = end - time.monotonic()
                if left <= 0 or self._done.is_set():
                    return stage in self._stage_starts
                self._lock.wait(min(left, 0.05))
        return True

    @property
    def log_text(self) -> str:
        return self.job_log.text()

    # -- internals -------------------------------------------------------------------------

    def _stage_started(self, stage: str) -> None:
        with self._lock:
            self._current_stage = stage
            self._stage_starts.setdefault(stage, time.monotonic())
            self._lock.notify_all()

    def _set_cancel_target(self, ctx: _Ctx) -> None:
        with self._lock:
            self._cancel_target = ctx

    def _main(self) -> None:
        started = time.monotonic()
        build: _Build | None = None
        err: _Err | None
        try:
            build = _Build(self.config, self.job, self)
            job_ctx = _Ctx(None, float(self.job.timeout) if self.job.timeout > 0 else 7200.0)
            with self._lock:
                self._job_ctx = job_ctx
                self._cancel_target = job_ctx
                pending, self._pending = self._pending, []
            for action in pending:
                job_ctx.cancel()
                self.runner_log.log("info", f"{action} requested before start")
            err = build.run(job_ctx)
        except Exception as exc:  # an emulator bug: report it rather than hang the caller
            err = _Err(f"emulator error: {exc!r}")
            self.runner_log.log("error", "emulator error", error=repr(exc))
        status, reason, exit_code = _outcome(err)
        log = self.job_log
        if err is None:
            log.info("Job succeeded")
        elif status == "system_failure":
            log.error(f"Job failed (system failure): {err}")
        else:
            log.error(f"Job failed: {err}")
        log.flush_live()
        with self._lock:
            self._result = JobResult(
                status=status, failure_reason=reason, exit_code=exit_code,
                error=None if err is None else str(err), log=log.text(),
                raw_log=log.raw_text(), runner_log=self.runner_log.text(),
                calls=list(build.calls) if build else [],
                tempdirs=list(build.tempdirs) if build else [],
                duration=time.monotonic() - started, masked_values=list(log.secrets))
            self._done.set()
            self._lock.notify_all()


def run_job(config: RunnerConfig, job: Job, *,
            cancel_at: tuple[str, float] | None = None,
            abort_at: tuple[str, float] | None = None,
            live_output: Callable[[str], None] | None = None,
            timeout: float | None = None) -> JobResult:
    """Run one job to its end and return what came of it.

    ``cancel_at=("build_script", 3.0)`` cancels like the UI does 3 s after the driver got that
    stage; ``abort_at`` does the same with an abort. ``timeout`` bounds the wait in the caller
    (TimeoutError), independent of the job's own timeout.
    """
    run = JobRun(config, job, live_output=live_output)
    if cancel_at is not None:
        run.schedule("cancel", *cancel_at)
    if abort_at is not None:
        run.schedule("abort", *abort_at)
    run.start()
    return run.wait(timeout)


def job_from_dict(data: Mapping[str, object]) -> Job:
    """A Job from a small dict/JSON: script (str or list), image, after_script, variables,
    masked_variables, steps ({name: lines}), cache ({key, paths, policy, when} or a list),
    git_strategy, timeout, project_path, name."""

    def lines(value: object) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [str(v) for v in value]
        raise ValueError(f"expected a string or a list of strings, got {value!r}")

    def mapping(value: object) -> dict[str, object]:
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {value!r}")
        return {str(k): v for k, v in value.items()}

    if "script" not in data:
        raise ValueError("the job needs a script")
    job = Job(script=lines(data["script"]))
    if data.get("image") is not None:
        job.image = str(data["image"])
    if data.get("after_script") is not None:
        job.after_script = lines(data["after_script"])
    for key, value in mapping(data.get("variables", {})).items():
        job.variables[key] = str(value)
    masked = data.get("masked_variables", [])
    job.masked_variables = set(lines(masked)) if masked else set()
    for name, value in mapping(data.get("steps", {})).items():
        job.extra_steps[name] = lines(value)
    caches = data.get("cache")
    if caches is not None:
        for entry in caches if isinstance(caches, list) else [caches]:
            spec = mapping(entry)
            job.cache.append(CacheSpec(paths=lines(spec.get("paths", [])),
                                       key=str(spec.get("key", "")),
                                       policy=str(spec.get("policy", "pull-push")),
                                       when=str(spec.get("when", "on_success"))))
    if "git_strategy" in data:
        job.git_strategy = None if data["git_strategy"] is None else str(data["git_strategy"])
    for key in ("timeout", "job_id", "project_id"):
        if key in data:
            value = data[key]
            if not isinstance(value, (int, str)):
                raise ValueError(f"{key} must be an integer")
            setattr(job, key, int(value))
    for key in ("project_path", "name", "stage"):
        if key in data:
            setattr(job, key, str(data[key]))
    return job


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
