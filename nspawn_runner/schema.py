"""Typed rows: the one parser behind the settings file and image files.

A table maps each key to a small parser; a parser takes the raw TOML value and returns the typed
value or raises `BadValue` with what was expected. `parse_table` applies a table to a TOML table
and names the file, the key and the value in every error, with a "did you mean" hint for
unknown keys.

One syntax for every file: a duration is a whole number of seconds or a string of a number and
one unit (`"90s"`, `"30m"`, `"1h"`, `"7d"`, `"2w"`); a size is a whole number of bytes or a
string of a number and K, M, G or T (powers of 1024, as systemd reads them: `"8G"`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nspawn_runner import log
from nspawn_runner.errors import SystemFailure

Parser = Callable[[object], Any]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*([0-9]+)\s*([smhdw]?)\s*$")
DURATION_SYNTAX = ("a whole number of seconds, or a number with s, m, h, d or w such as '90s' "
                   "or '1h'")
SIZE_SYNTAX = "a whole number of bytes, or a number with K, M, G or T such as '8G'"
# Image names are directory names under <root>/images and machine host names: what systemd
# accepts as a machine name.
IMAGE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]|\.(?!\.|$)){0,63}$")
IMAGE_NAME_RULE = ("letters, digits, '-' and '.', starting with a letter or digit, at most 64 "
                   "characters, no '..'")


class BadValue(ValueError):
    """Raised by parsers; `parse_table` adds the file and the key to the message."""


def string(value: object) -> str:
    if not isinstance(value, str):
        raise BadValue(f"expected a string, got {type(value).__name__}")
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise BadValue("expected true or false")
    return value


def integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValue(f"expected a whole number, got {type(value).__name__}")
    return value


def seconds(value: object) -> int:
    """A duration greater than 0 (a timeout)."""
    if isinstance(value, str) and value.strip() in ("", "never"):
        raise BadValue(f"expected a duration greater than 0: {DURATION_SYNTAX}")
    result = duration(value)
    if result <= 0:
        raise BadValue(f"expected a duration greater than 0: {DURATION_SYNTAX}")
    return result


def size(value: object) -> str:
    """A size as systemd reads it ("8G", "1073741824"); "" is unset. Whether a percentage or
    `infinity` is allowed too is up to the setting's own check."""
    if isinstance(value, bool):
        raise BadValue(f"expected a size: {SIZE_SYNTAX}")
    if isinstance(value, int):
        if value < 0:
            raise BadValue(f"expected a size of 0 or more: {SIZE_SYNTAX}")
        return str(value)
    return string(value).strip()


def abs_path(value: object) -> Path:
    text = string(value)
    if not text.startswith("/"):
        raise BadValue("expected an absolute path")
    if ".." in text.split("/"):
        raise BadValue("expected an absolute path without '..'")
    return Path(text)


def image_name(value: object) -> str:
    """An image name, or empty."""
    text = string(value)
    if text and not IMAGE_NAME.match(text):
        raise BadValue(f"expected an image name: {IMAGE_NAME_RULE}")
    return text


def str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadValue("expected a list of strings")
    return tuple(value)


def str_or_list(value: object) -> tuple[str, ...]:
    """A string (one item) or a list of strings; blank items dropped."""
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v for v in value if v.strip())
    raise BadValue("expected a string or a list of strings")


def choice(*choices: str) -> Parser:
    def parse(value: object) -> str:
        text = string(value)
        if text not in choices:
            raise BadValue("expected one of " + ", ".join(choices))
        return text

    return parse


def matching(pattern: re.Pattern[str], what: str) -> Callable[[object], str]:
    """A string that is empty or matches `pattern` (`what` says what it should look like)."""

    def parse(value: object) -> str:
        text = string(value)
        if text and not pattern.match(text):
            raise BadValue(f"expected {what}")
        return text

    return parse


def list_of(item: Callable[[object], str]) -> Callable[[object], tuple[str, ...]]:
    def parse(value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise BadValue("expected a list of strings")
        return tuple(item(v) for v in value)

    return parse


def checked(base: Parser, check: Callable[[Any], Any],
            errors: tuple[type[Exception], ...] = (ValueError,)) -> Parser:
    """`base` for the type, then `check` for the range; `check`'s `errors` become BadValue."""

    def parse(value: object) -> Any:
        typed = base(value)
        try:
            return check(typed)
        except BadValue:
            raise
        except errors as e:
            raise BadValue(str(e)) from None

    return parse


def duration(value: object) -> int:
    """Seconds from "7d", "12h", "30m", "2w", "90s" or a whole number of seconds; 0, "" and
    "never" are 0 (none)."""
    if isinstance(value, bool):
        raise BadValue(f"expected a duration: {DURATION_SYNTAX}")
    if isinstance(value, int):
        if value < 0:
            raise BadValue(f"expected a duration of 0 or more: {DURATION_SYNTAX}")
        return value
    if not isinstance(value, str):
        raise BadValue(f"expected a duration: {DURATION_SYNTAX}, got {type(value).__name__}")
    if value.strip() in ("", "never"):
        return 0
    match = _DURATION.match(value)
    if not match:
        raise BadValue(f"expected a duration: {DURATION_SYNTAX}")
    return int(match[1]) * _UNITS[match[2] or "s"]


def parse_table(data: Mapping[str, object], parsers: Mapping[str, Parser], where: str,
                error: type[SystemFailure], skip: tuple[str, ...] = (),
                prefix: str = "", unknown: str = "warn",
                misplaced: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse every key of `data` with its row in `parsers`. Keys in `skip` are left to the
    caller. An unknown key is a warning (`unknown="warn"`) or an `error` ("error"); an unknown
    table is always an error (every key in it would be lost), with the hint in `misplaced` for
    tables people put in the wrong file. A bad value is always an `error` naming `where`, the
    key and the value."""
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key in skip:
            continue
        parser = parsers.get(key)
        if parser is None and isinstance(raw, dict):
            hint = (misplaced or {}).get(key) or (
                "its keys belong at the top of the file, above the first [table] header")
            raise error(f"{where}: unknown table [{prefix + key}]: {hint}")
        if parser is None:
            import difflib  # only for the message: every stage reads the settings

            close = difflib.get_close_matches(key, [*parsers, *skip], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if unknown == "error":
                raise error(f"{where}: unknown key {prefix + key!r}{hint}; allowed: "
                            + ", ".join(sorted(parsers)))
            log.warn(f"{where}: unknown key {prefix + key!r} ignored{hint}")
            continue
        try:
            values[key] = parser(raw)
        except BadValue as e:
            raise error(f"{where}: invalid value {raw!r} for {prefix + key!r}: {e}") from None
    return values
