"""Driver messages on stderr: terse by default, commands and details with --verbose.

Deliberately not the logging module: this is imported on the `run` hot path. Every message
passes through `mask`, so job secrets never reach the driver's own output."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

_verbose = bool(os.environ.get("NSPAWN_RUNNER_VERBOSE"))
_secrets: set[str] = set()
# user:password@ in any URL (CI_REPOSITORY_URL carries the job token that way).
_URL_CREDENTIALS = r"(?<=://)[^/@\s:]*:[^/@\s]*@"
MASK = "[MASKED]"


def set_verbose(on: bool) -> None:
    global _verbose
    _verbose = on


def verbose() -> bool:
    return _verbose


def add_secret(value: str) -> None:
    # Very short values would mask half of every message; gitlab-runner requires 8+ chars too.
    if len(value) >= 8:
        _secrets.add(value)


def mask(text: str) -> str:
    import re  # not at the top: `run` prints nothing when all goes well

    text = re.sub(_URL_CREDENTIALS, MASK + "@", text)
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def info(msg: str) -> None:
    print(mask(msg), file=sys.stderr, flush=True)


def debug(msg: str) -> None:
    if _verbose:
        print(mask(msg), file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print("warning: " + mask(msg), file=sys.stderr, flush=True)


def error(msg: str) -> None:
    print("error: " + mask(msg), file=sys.stderr, flush=True)


def redact_argv(argv: Sequence[str]) -> str:
    """A command line as a copy-pasteable, masked line."""
    import shlex  # only for messages: keeps `run`'s imports small

    return mask(shlex.join(argv))
