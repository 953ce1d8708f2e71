"""The image file: `<images_config_dir>/<NAME>.toml` says how image NAME is created and
provisioned, and which per-image limits prepare applies. Read with tomllib, written with tomlkit
(comments kept); the result is a frozen `ImageSpec`. See docs/images.md for the keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nspawn_runner import log, schema
from nspawn_runner.errors import SystemFailure
from nspawn_runner.images import names as image_names
from nspawn_runner.settings import SETTINGS, Settings

DEBIAN_TOOLS = ("mmdebstrap", "debootstrap")
BOOTSTRAPS = (*DEBIAN_TOOLS, "command")
# "extract" leaves packages unpacked but not installed: nothing that boots.
MMDEBSTRAP_VARIANTS = ("minbase", "required", "important", "standard", "buildd", "apt",
                       "essential", "custom", "debootstrap")
# "default" is debootstrap without --variant (required and important packages).
DEBOOTSTRAP_VARIANTS = ("minbase", "buildd", "default")
PERSONALITIES = ("x86", "x86-64")
# What every image gets whatever its file says: boots (systemd, dbus: `systemd-run --machine`
# needs it), clones (git, and ca-certificates for HTTPS: minbase has none).
REQUIRED_PACKAGES = ("systemd", "systemd-sysv", "dbus", "git", "ca-certificates")
# Architectures whose binaries the x86-64 kernel runs with a 32-bit personality.
_PERSONALITY_OF = {"i386": "x86"}
TARGET = "{target}"
_SUITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")
_ARCH = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_COMPONENT = re.compile(r"^[a-z0-9][a-z0-9/-]*$")
# A package name, optionally with :arch, =version or /release; no ',' (the --include
# separator), no whitespace, no leading '-' (an option).
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.:=~/-]*$")
_MIRROR = re.compile(r"^(https?|file)://\S+$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*$")
MAX_POOL = 64
# The keys whose change means the image must be made anew (not only provisioned again).
RECIPE_KEYS = ("bootstrap", "suite", "mirror", "architecture", "components", "variant",
               "packages", "bootstrap_options", "command", "import_from")


class ImageFileError(SystemFailure):
    """An image file is missing, unreadable or has a bad value; the message names the file,
    the key and the value."""


@dataclass(frozen=True)
class ImageSpec:
    name: str
    file: Path | None
    bootstrap: str  # one of BOOTSTRAPS, or "import"
    suite: str = ""
    mirror: str = ""  # empty: the host's own Debian mirror
    architecture: str = ""  # empty: the host's
    components: tuple[str, ...] = ("main",)
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    bootstrap_options: tuple[str, ...] = ()  # more options for mmdebstrap or debootstrap
    command: tuple[str, ...] = ()
    import_from: str = ""  # a path or URL of a tarball
    setup: tuple[str, ...] = ()
    playbook: Path | None = None
    recreate_after: int = 0  # seconds; 0: never
    personality: str = ""  # systemd-nspawn --personality=, empty: none
    hostname: str = ""
    pool_size: int | None = None  # machines booted ahead for this image; None: the settings'
    # Per-image overrides of the runner's limits (settings names and parsed values).
    limits: tuple[tuple[str, Any], ...] = ()

    @property
    def debian(self) -> bool:
        """Made by a Debian bootstrapper: apt inside, and the package cache applies."""
        return self.bootstrap in DEBIAN_TOOLS

    @property
    def provisioned(self) -> bool:
        return bool(self.setup or self.playbook)

    def all_packages(self) -> tuple[str, ...]:
        """`packages` plus what every image needs (and python3 for a playbook's modules)."""
        extra = ("python3",) if self.playbook else ()
        wanted = [*REQUIRED_PACKAGES, *extra, *self.packages]
        return tuple(dict.fromkeys(wanted))

    def limit_overrides(self) -> dict[str, Any]:
        """For `Settings.limits(**overrides)`."""
        return dict(self.limits)

    def recipe(self) -> str:
        """A digest of how the image is made: maintenance recreates the image when it changes."""
        data = {k: getattr(self, k) for k in RECIPE_KEYS}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def parse_duration(value: object) -> int:
    """Seconds from 7d, 12h, 30m, 2w, 90s or a whole number of seconds; 0 or "" is never."""
    return schema.duration(value)


def _option(value: object) -> str:
    text = schema.string(value)
    if not text.startswith("--"):
        raise schema.BadValue("expected options such as '--aptopt=...', each starting with '--'")
    return text


def _command(value: object) -> tuple[str, ...]:
    argv = schema.list_of(schema.string)(value)
    if not argv or not argv[0]:
        raise schema.BadValue("expected a command as a list: program first, then its arguments")
    if not any(TARGET in a for a in argv):
        raise schema.BadValue(f"the command must name the directory to fill as {TARGET}")
    return argv


def _pool_size(value: int) -> int:
    if not 0 <= value <= MAX_POOL:
        raise schema.BadValue(f"expected 0 to {MAX_POOL} machines kept booted ahead")
    return value


_PARSERS: dict[str, Callable[[object], Any]] = {
    "bootstrap": schema.string,
    "suite": schema.matching(_SUITE, "a suite or codename such as 'bookworm' or 'sid'"),
    "mirror": schema.matching(_MIRROR, "a URL (http://, https:// or file://)"),
    "architecture": schema.matching(_ARCH, "a Debian architecture such as 'amd64' or 'i386'"),
    "components": schema.list_of(schema.matching(_COMPONENT, "archive components such as 'main'")),
    "variant": schema.string,
    "packages": schema.list_of(
        schema.matching(_PACKAGE, "package names (no ',', spaces or leading '-')")),
    "bootstrap_options": schema.list_of(_option),
    "command": _command,
    "import": schema.matching(re.compile(r"^\S"), "a path or URL"),
    "setup": schema.str_or_list,
    "playbook": schema.matching(re.compile(r"^\S"), "the path of a playbook"),
    "recreate_after": parse_duration,
    "personality": schema.string,
    "hostname": schema.matching(_HOSTNAME, "a host name"),
    "pool_size": schema.checked(schema.integer, _pool_size),
}


def _limit_rows() -> dict[str, Callable[[object], Any]]:
    """The settings a `[limits]` table may override: those of limits.Limits."""
    from nspawn_runner.host import limits

    names = {f.name for f in dataclasses.fields(limits.Limits)}
    return {row.name: row.parse for row in SETTINGS if row.name in names}


def path_of(settings: Settings, name: str) -> Path:
    return settings.images_config_dir / f"{name}.toml"


def files(settings: Settings) -> list[Path]:
    """Every `*.toml` in images_config_dir, sorted, valid names or not."""
    try:
        return sorted(p for p in settings.images_config_dir.glob("*.toml") if p.is_file())
    except OSError:
        return []


def names(settings: Settings) -> list[str]:
    """The images that have a file, sorted."""
    found = []
    for entry in files(settings):
        try:
            image_names.validate_name(entry.stem)
        except image_names.ImageError:
            log.warn(f"{entry}: ignored: {entry.stem!r} is not a valid image name "
                     f"({image_names.NAME_RULE})")
            continue
        found.append(entry.stem)
    return found


def read(path: Path) -> dict[str, Any]:
    # tomllib: prepare reads the image file for every job; `save` uses tomlkit to keep comments.
    import tomllib

    try:
        text = path.read_text()
    except OSError as e:
        raise ImageFileError(f"cannot read image file {path}: {e.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ImageFileError(f"image file {path} is not valid TOML: {e}; fix the syntax") from None


def load(settings: Settings, name: str,
         overrides: Mapping[str, object] | None = None) -> ImageSpec | None:
    """The spec of image `name` from its file, None when it has no file (and no overrides)."""
    image_names.validate_name(name)
    path = path_of(settings, name)
    if path.exists():
        data = read(path)
    elif overrides:
        data = {}
    else:
        return None
    data.update(overrides or {})
    spec = parse(name, data, path if path.exists() else None, shown=path, settings=settings)
    if spec.limit_overrides().get("private_users"):
        _check_private_users(settings, path)
    return spec


def _check_private_users(settings: Settings, path: Path) -> None:
    """What prepare would refuse for every job, refused when the file is read."""
    from nspawn_runner.host import backends

    if not settings.root.is_dir():
        return  # nothing to tell the backend by; check and prepare say the root is missing
    backend = backends.choose(settings.backend, settings.root)
    if backend is not backends.Backend.BTRFS:
        raise ImageFileError(
            f"{path}: invalid value True for 'limits.private_users': private users need the "
            f"btrfs backend, and jobs here get the {backend} backend ({settings.root}); put "
            "the state root on btrfs or remove private_users from the file")


def parse(name: str, data: Mapping[str, object], file: Path | None,
          shown: Path | None = None, settings: Settings | None = None) -> ImageSpec:
    """Validate `data` (an image file's contents) into an ImageSpec. Errors name `shown` (the
    file), the key and the value. `settings` (the defaults if None) is what [limits] binds
    are checked against: the state root, builds_dir and cache_dir."""
    where = str(shown or file or f"image {name}")
    base = (file or shown or Path(".")).parent
    values = schema.parse_table(data, _PARSERS, where, ImageFileError, skip=("limits",))
    if "limits" in data:
        values["limits"] = _parse_limits(where, data["limits"], settings or Settings())

    def bad(key: str, why: str) -> ImageFileError:
        return ImageFileError(f"{where}: invalid value {data.get(key)!r} for {key!r}: {why}")

    if "import" in values and "command" in values:
        raise bad("import", "an image is either imported or made by a command, not both")
    default = ("import" if "import" in values else "command" if "command" in values
               else "mmdebstrap" if shutil.which("mmdebstrap") else "debootstrap")
    bootstrap = values.pop("bootstrap", default)
    if bootstrap not in (*BOOTSTRAPS, "import") or (bootstrap == "import") != ("import" in values):
        raise bad("bootstrap", "expected one of " + ", ".join(BOOTSTRAPS) +
                  " (or no bootstrap and import = PATH|URL)")
    if bootstrap == "command" and "command" not in values:
        raise ImageFileError(f"{where}: bootstrap = \"command\" needs command = [...], the argv "
                             f"that fills the directory {TARGET}")
    if "bootstrap_options" in values and bootstrap not in DEBIAN_TOOLS:
        raise bad("bootstrap_options", f"only used with {' or '.join(DEBIAN_TOOLS)}")
    if bootstrap in DEBIAN_TOOLS:
        if "command" in values:
            raise bad("command", f"only used with bootstrap = \"command\", not {bootstrap!r}")
        if not values.get("suite"):
            raise ImageFileError(f"{where}: 'suite' is required with bootstrap = "
                                 f"{bootstrap!r}, e.g. suite = \"bookworm\"")
        variants = MMDEBSTRAP_VARIANTS if bootstrap == "mmdebstrap" else DEBOOTSTRAP_VARIANTS
        if values.get("variant", "minbase") not in variants:
            raise bad("variant", f"{bootstrap} variants are " + ", ".join(variants))
    personality = values.pop("personality", None)
    if personality is None:
        personality = _PERSONALITY_OF.get(values.get("architecture", ""), "")
    elif personality not in ("", *PERSONALITIES):
        raise bad("personality", "expected one of " + ", ".join(PERSONALITIES))
    playbook = values.pop("playbook", None)
    imported = values.pop("import", "")
    if imported and "://" not in imported:
        imported = str(base / imported)
    return ImageSpec(
        name=name, file=file, bootstrap=bootstrap, personality=personality,
        playbook=base / playbook if playbook else None, import_from=imported, **values)


def _parse_limits(where: str, raw: object, settings: Settings) -> tuple[tuple[str, Any], ...]:
    from nspawn_runner.host import limits

    if not isinstance(raw, dict):
        raise ImageFileError(f"{where}: invalid value {raw!r} for 'limits': expected a table, "
                             "[limits] with settings such as memory_max = \"4G\"")
    parsed = schema.parse_table(raw, _limit_rows(), where, ImageFileError, prefix="limits.",
                                unknown="error")
    for bind in parsed.get("binds", ()):
        try:
            limits.parse_bind(bind, settings.root, (settings.builds_dir, settings.cache_dir))
        except limits.LimitError as e:
            raise ImageFileError(f"{where}: invalid value {raw['binds']!r} for 'limits.binds': "
                                 f"{e}") from None
    return tuple(parsed.items())


def save(path: Path, updates: Mapping[str, object]) -> None:
    """Set `updates` in the image file at `path` (created if missing), keeping its comments
    and layout. Written atomically: a job's prepare never reads half a file."""
    import tomlkit

    if path.exists():
        doc = tomlkit.parse(path.read_text())
    else:
        doc = tomlkit.document()
        doc.add(tomlkit.comment(f"Image {path.stem}: see docs/images.md of nspawn-runner."))
    for key, value in updates.items():
        doc[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(tomlkit.dumps(doc))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def overrides(settings: Settings, name: str, include: Sequence[str] = (),
              **values: str | None) -> dict[str, object]:
    """Command-line options as image file keys: the given `values`, and `include` added to the
    file's packages."""
    image_names.validate_name(name)
    out: dict[str, object] = {k: v for k, v in values.items() if v is not None}
    if include:
        path = path_of(settings, name)
        current = read(path).get("packages", []) if path.exists() else []
        if not isinstance(current, list):
            current = []
        out["packages"] = list(dict.fromkeys([*map(str, current), *include]))
    return out
