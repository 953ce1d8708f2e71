"""Settings: one table of typed rows, from which the file parser, `nspawn-runner settings` and
docs/configuration.md are made. The result is a frozen `Settings`."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nspawn_runner import log
from nspawn_runner.errors import SystemFailure

DEFAULT_CONFIG = Path("/etc/nspawn-runner/config.toml")
DEFAULT_ROOT = Path("/var/lib/nspawn-runner")
BACKENDS = ("auto", "btrfs", "overlay", "volatile")
SHELLS = ("bash", "sh")


class SettingsError(SystemFailure):
    pass


@dataclass(frozen=True)
class Settings:
    root: Path = DEFAULT_ROOT
    default_image: str = ""
    allowed_images: tuple[str, ...] = ()
    backend: str = "auto"
    boot_timeout: int = 120
    stop_timeout: int = 30
    builds_dir: str = "/builds"
    cache_dir: str = "/cache"
    shell: str = "bash"
    gitlab_runner: str = ""
    secret_variables: tuple[str, ...] = ()
    # Where each value came from ("default", a file path, an environment variable).
    origins: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def images_dir(self) -> Path:
        return self.root / "images"


Parser = Callable[[object], Any]


@dataclass(frozen=True)
class Row:
    name: str
    parse: Parser
    help: str
    env: str | None = None

    @property
    def default(self) -> object:
        return _DEFAULTS[self.name]


class _BadValue(ValueError):
    """Raised by parsers; the loader adds file and key to the message."""


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _BadValue(f"expected a string, got {type(value).__name__}")
    return value


def _abs_path(value: object) -> Path:
    text = _str(value)
    if not text.startswith("/"):
        raise _BadValue("expected an absolute path")
    return Path(text)


def _inner_path(value: object) -> str:
    text = _str(value)
    if not text.startswith("/") or text == "/" or ".." in text.split("/") or ":" in text:
        raise _BadValue(
            "expected an absolute path inside the machine, not '/', without '..' or ':'")
    return text.rstrip("/")


def _seconds(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadValue(f"expected a whole number of seconds, got {type(value).__name__}")
    if value <= 0:
        raise _BadValue("expected a number of seconds greater than 0")
    return value


def _choice(*choices: str) -> Parser:
    def parse(value: object) -> str:
        text = _str(value)
        if text not in choices:
            raise _BadValue("expected one of " + ", ".join(choices))
        return text

    return parse


def _str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _BadValue("expected a list of strings")
    return tuple(value)


SETTINGS: tuple[Row, ...] = (
    Row("root", _abs_path, "State root: images/, cache/, overlays/ live below it.",
        env="NSPAWN_RUNNER_ROOT"),
    Row("default_image", _str, "Image for jobs that name none (`--default-image` overrides)."),
    Row("allowed_images", _str_list,
        "If not empty, only images matching one of these shell patterns may be used."),
    Row("backend", _choice(*BACKENDS),
        "How a job's writable layer is made: auto (btrfs snapshot on btrfs, overlay elsewhere), "
        "btrfs, overlay (upper dir under root) or volatile (tmpfs, lost at cleanup)."),
    Row("boot_timeout", _seconds,
        "Seconds prepare waits for a machine to boot; keep it below prepare_exec_timeout."),
    Row("stop_timeout", _seconds, "Seconds cleanup lets a machine shut down before killing it."),
    Row("builds_dir", _inner_path, "builds_dir reported to gitlab-runner (inside the machine)."),
    Row("cache_dir", _inner_path,
        "cache_dir reported to gitlab-runner; bound from <root>/cache so caches outlive jobs."),
    Row("shell", _choice(*SHELLS), "Shell that runs job scripts inside the machine."),
    Row("gitlab_runner", _str,
        "Host path of the gitlab-runner binary bound into machines; empty: search PATH."),
    Row("secret_variables", _str_list,
        "Extra job variable names whose values never appear in the driver's output."),
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings) if f.name != "origins"}


def reference_markdown() -> str:
    """docs/configuration.md's table, made from SETTINGS so the docs cannot drift."""
    lines = ["| key | default | environment | meaning |", "|---|---|---|---|"]
    for row in SETTINGS:
        default = row.default
        if isinstance(default, tuple):
            default = list(default)
        shown = f"`{default}`" if default not in ("", []) else "(empty)"
        lines.append(f"| `{row.name}` | {shown} | {f'`{row.env}`' if row.env else ''} "
                     f"| {row.help} |")
    return "\n".join(lines) + "\n"


def config_path() -> Path:
    return Path(os.environ.get("NSPAWN_RUNNER_CONFIG", DEFAULT_CONFIG))


def _read(path: Path) -> dict[str, object]:
    import tomlkit
    from tomlkit.exceptions import ParseError

    try:
        text = path.read_text()
    except FileNotFoundError:
        if "NSPAWN_RUNNER_CONFIG" in os.environ:
            raise SettingsError(
                f"settings file {path} (from NSPAWN_RUNNER_CONFIG) does not exist; "
                "create it or unset NSPAWN_RUNNER_CONFIG"
            ) from None
        return {}
    except OSError as e:
        raise SettingsError(f"cannot read settings file {path}: {e.strerror}; "
                            "check its permissions") from None
    try:
        return tomlkit.parse(text).unwrap()
    except ParseError as e:
        raise SettingsError(
            f"settings file {path} is not valid TOML: {e}; fix the syntax") from None


def load(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    path = path or config_path()
    environ = dict(os.environ) if environ is None else environ
    data = _read(path)
    rows = {row.name: row for row in SETTINGS}
    values: dict[str, object] = {}
    origins = {row.name: "default" for row in SETTINGS}
    for key, raw in data.items():
        row = rows.get(key)
        if row is None:
            close = difflib.get_close_matches(key, rows, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            log.warn(f"{path}: unknown setting {key!r} ignored{hint}")
            continue
        try:
            values[key] = row.parse(raw)
        except _BadValue as e:
            raise SettingsError(f"{path}: invalid value {raw!r} for {key!r}: {e}") from None
        origins[key] = str(path)
    for row in SETTINGS:
        if row.env and environ.get(row.env):
            try:
                values[row.name] = row.parse(environ[row.env])
            except _BadValue as e:
                raise SettingsError(
                    f"environment variable {row.env}={environ[row.env]!r}: {e}") from None
            origins[row.name] = row.env
    return Settings(**values, origins=origins)  # type: ignore[arg-type]
