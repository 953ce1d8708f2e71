"""Driver messages on stderr: terse by default, commands and details with --verbose.

Deliberately not the logging module: this is imported on the `run` hot path. Every message
passes through `mask`, so job secrets never reach the driver's own output."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# Set, and not one of the usual ways of saying no.
_verbose = os.environ.get("NSPAWN_RUNNER_VERBOSE", "").strip().lower() not in (
    "", "0", "no", "false", "off")
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


_ANSI = {"error": "1;31", "warn": "1;33", "ok": "32"}


def colour(stream: object) -> bool:
    """Colour only for a person: a terminal, and neither NO_COLOR nor TERM=dumb."""
    isatty = getattr(stream, "isatty", None)
    return (callable(isatty) and bool(isatty()) and "NO_COLOR" not in os.environ
            and os.environ.get("TERM") != "dumb")


def paint(text: str, kind: str, on: bool) -> str:
    """`text` in the colour of `kind` ("error", "warn", "ok") if `on`."""
    return f"\033[{_ANSI[kind]}m{text}\033[0m" if on and kind in _ANSI else text


def info(msg: str) -> None:
    print(mask(msg), file=sys.stderr, flush=True)


def debug(msg: str) -> None:
    if _verbose:
        print(mask(msg), file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(paint("warning:", "warn", colour(sys.stderr)) + " " + mask(msg), file=sys.stderr,
          flush=True)


def error(msg: str) -> None:
    print(paint("error:", "error", colour(sys.stderr)) + " " + mask(msg), file=sys.stderr,
          flush=True)


def redact_argv(argv: Sequence[str]) -> str:
    """A command line as a copy-pasteable, masked line."""
    import shlex  # only for messages: keeps `run`'s imports small

    return mask(shlex.join(argv))
