"""Go behaviour the runner relies on, reproduced: ShellEscape, strconv.Quote/Atoi,
time.ParseDuration, os.Expand, path.Join, encoding/json, ANSI stripping."""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable
from typing import Final

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
