"""Settings: one table of typed rows, from which the file parser, `nspawn-runner settings` and
docs/configuration.md are made. The result is a frozen `Settings`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nspawn_runner import layout, schema, table
from nspawn_runner.errors import SystemFailure
from nspawn_runner.host import limits
from nspawn_runner.host import netplan as net

BACKENDS = ("auto", "btrfs", "overlay", "volatile")


class SettingsError(SystemFailure):
    pass


@dataclass(frozen=True)
class Settings:
    root: Path = layout.DEFAULT_ROOT
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
    images_config_dir: Path = layout.DEFAULT_IMAGES_CONFIG_DIR
    package_cache: str = ""
    cpu_weight: int = 0
    cpu_quota: str = ""
    memory_high: str = ""
    memory_max: str = ""
    tasks_max: int = 0
    max_job_duration: int = 0
    network: str = "isolated"
    network_ipv4_pool: str = net.DEFAULT_IPV4_POOL
    network_host_ports: tuple[str, ...] = ()
    network_dns: tuple[str, ...] = ()
    network_check_url: str = ""
    user: str = "root"
    private_users: bool = False
    binds: tuple[str, ...] = ()
    nspawn_options: tuple[str, ...] = ()
    persistent_builds: bool = False
    devices: tuple[str, ...] = ()
    step_start_timeout: int = 60
    cache_max_age: int = 30 * 86400
    builds_max_age: int = 14 * 86400
    suppress_sync: bool = False
    boot_mask: tuple[str, ...] = limits.BOOT_MASK
    pool_size: int = 0
    # Where each value came from ("default", a file path, an environment variable).
    origins: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def images_dir(self) -> Path:
        return layout.images_dir(self.root)

    @property
    def package_cache_dir(self) -> Path:
        return Path(self.package_cache) if self.package_cache else layout.package_cache(self.root)

    def network_options(self, mode: str) -> net.Options:
        """For a job whose limits say network = `mode` (the image's file may override it)."""
        return net.Options(mode=mode, ipv4_pool=self.network_ipv4_pool,
                           host_ports=self.network_host_ports, dns=self.network_dns)

    def limits(self, **overrides: object) -> limits.Limits:
        """The limits for a job; `overrides` come from the image's file."""
        values: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(limits.Limits)}
        values.update(overrides)
        binds = values.pop("binds")
        assert isinstance(binds, tuple)
        try:
            parsed = tuple(limits.parse_bind(b, self.root, (self.builds_dir, self.cache_dir))
                           for b in binds)
        except limits.LimitError as e:
            raise SettingsError(f"{self.origins.get('binds', 'settings')}: binds: {e}") from None
        return limits.Limits(binds=parsed, **values)


@dataclass(frozen=True)
class Row:
    name: str
    parse: schema.Parser
    help: str
    env: str | None = None

    @property
    def default(self) -> object:
        return _DEFAULTS[self.name]


def _abs_dir_or_empty(value: object) -> str:
    text = schema.string(value)
    # mmdebstrap's sync-in/sync-out hooks split their arguments at spaces.
    if text and (not text.startswith("/") or any(c.isspace() for c in text)):
        raise schema.BadValue("expected an absolute path without spaces, or empty")
    return text


def _inner_path(value: object) -> str:
    text = schema.string(value)
    if not text.startswith("/") or text == "/" or ".." in text.split("/") or ":" in text:
        raise schema.BadValue(
            "expected an absolute path inside the machine, not '/', without '..' or ':'")
    return text.rstrip("/")


def _limit(base: schema.Parser, check: Callable[[Any], Any]) -> schema.Parser:
    """`base` for the type, then one of limits.parse_* for the range."""
    return schema.checked(base, check, (limits.LimitError,))


def _each(check: Callable[[str], str]) -> schema.Parser:
    return schema.checked(schema.str_list, lambda items: tuple(check(v) for v in items),
                          (limits.LimitError,))


def _pool_size(value: int) -> int:
    if not 0 <= value <= 64:
        raise limits.LimitError("expected 0 to 64 machines kept booted ahead")
    return value


def _network_list(check: Callable[[str], str]) -> schema.Parser:
    return schema.checked(schema.str_list, lambda items: tuple(check(v) for v in items),
                          (net.BadSetting,))


def _non_negative(value: int) -> int:
    if value < 0:
        raise limits.LimitError("expected 0 or more")
    return value


SETTINGS: tuple[Row, ...] = (
    Row("root", _limit(schema.abs_path, limits.parse_state_root),
        "State root: images/, cache/, overlays/ live below it (a directory of its own, not a "
        "system directory).", env="NSPAWN_RUNNER_ROOT"),
    Row("default_image", schema.image_name,
        "Image for jobs that name none (`--default-image` overrides)."),
    Row("allowed_images", schema.str_list,
        "If not empty, only images matching one of these shell patterns may be used."),
    Row("backend", schema.choice(*BACKENDS),
        "How a job's writable layer is made: auto (btrfs snapshot on btrfs, overlay elsewhere), "
        "btrfs, overlay (upper dir under root) or volatile (tmpfs, lost at cleanup)."),
    Row("boot_timeout", schema.seconds,
        "How long prepare waits for a machine to boot (seconds, or '2m'); keep it below "
        "prepare_exec_timeout."),
    Row("stop_timeout", schema.seconds,
        "How long cleanup lets a machine shut down before killing it (seconds, or '1m')."),
    Row("builds_dir", _inner_path, "builds_dir reported to gitlab-runner (inside the machine)."),
    Row("cache_dir", _inner_path,
        "cache_dir reported to gitlab-runner; bound from <root>/cache so caches outlive jobs."),
    Row("shell", schema.choice(*layout.SHELLS), "Shell that runs job scripts inside the machine."),
    Row("gitlab_runner", schema.string,
        "Host path of the gitlab-runner binary bound into machines; empty: search PATH."),
    Row("secret_variables", schema.str_list,
        "Extra job variable names whose values never appear in the driver's output."),
    Row("images_config_dir", schema.abs_path,
        "Directory of the image files, <NAME>.toml (see docs/images.md)."),
    Row("package_cache", _abs_dir_or_empty,
        "Directory of downloaded packages shared by image builds; empty: <root>/package-cache."),
    Row("cpu_weight", _limit(schema.integer, limits.parse_cpu_weight),
        "CPUWeight= of each job's machine (1-10000, 0: systemd's default)."),
    Row("cpu_quota", _limit(schema.string, limits.parse_percent),
        "CPUQuota= of each job's machine, e.g. '200%' for two CPUs."),
    Row("memory_high", _limit(schema.size, limits.parse_size),
        "MemoryHigh= of each job's machine (throttled above it), e.g. '6G' or bytes."),
    Row("memory_max", _limit(schema.size, limits.parse_size),
        "MemoryMax= of each job's machine (OOM-killed above it), e.g. '8G' or bytes."),
    Row("tasks_max", _limit(schema.integer, limits.parse_tasks),
        "TasksMax= of each job's machine (at most 16384; 0: systemd's default)."),
    Row("max_job_duration", schema.duration,
        "How long until a job's machine is stopped whatever happens (seconds, or '3h'; 0: no "
        "limit)."),
    Row("network", _limit(schema.string, limits.parse_network),
        "isolated (a network zone per job: the world, not the host's services or other "
        "jobs; docs/networking.md), host (share the host's network, its 127.0.0.1 "
        "included) or none (loopback only)."),
    Row("network_ipv4_pool", schema.checked(schema.string, net.parse_ipv4_pool),
        "Private IPv4 network from which each isolated job gets a /28; keep it clear of "
        "the host's networks."),
    Row("network_host_ports", _network_list(net.parse_host_port),
        "Ports of the host that isolated jobs may reach, e.g. ['3142/tcp'] for a package "
        "proxy; everything else on the host is refused."),
    Row("network_dns", _network_list(net.parse_dns),
        "DNS servers for isolated jobs; empty: the host's, or systemd-resolved's upstream "
        "servers when /etc/resolv.conf names a loopback stub."),
    Row("network_check_url", schema.string,
        "URL that `check` reaches from a job's machine to prove isolated jobs get out "
        "(e.g. your GitLab's); empty: not tried."),
    Row("user", _limit(schema.string, limits.parse_user),
        "User that runs job scripts; created in the machine with a home if missing."),
    Row("private_users", schema.boolean,
        "Run machines in their own user namespace (--private-users=pick): root inside is "
        "not root outside."),
    Row("binds", schema.str_list,
        "Extra binds HOST:INSIDE[:ro|rw]; '/', the state root and container sockets are "
        "refused."),
    Row("nspawn_options", _each(limits.parse_nspawn_option),
        "Extra systemd-nspawn options, from a list of safe ones (see docs/security.md)."),
    Row("persistent_builds", schema.boolean,
        "Keep builds_dir on the host per runner, project and concurrent slot "
        "(<root>/builds/...), so GIT_STRATEGY=fetch reuses clones between jobs; the driver "
        "picks a slot no running job holds."),
    Row("devices", _each(limits.parse_device),
        "Host character devices bound into every machine and allowed by its device policy "
        "(/dev/fuse, /dev/kvm, /dev/net/tun); all others stay closed."),
    Row("step_start_timeout", schema.seconds,
        "Seconds a job step may take to start before run reports a hanging "
        "`systemd-run --machine` (a system failure)."),
    Row("cache_max_age", schema.duration,
        "gc removes cache entries not written for this long, e.g. '30d' (0: never)."),
    Row("builds_max_age", schema.duration,
        "gc removes persistent builds directories not used for this long (0: never)."),
    Row("suppress_sync", schema.boolean,
        "systemd-nspawn --suppress-sync=yes: fsync() and sync() do nothing in the machine "
        "(much faster package installs), but open() with O_SYNC or O_DSYNC fails, and what a "
        "job writes to its cache may be lost if the host crashes."),
    Row("boot_mask", _each(limits.parse_unit),
        "Units masked when a machine boots (units a CI job never needs; faster boot). "
        "The default list is in docs/performance.md; [] masks none."),
    Row("pool_size", _limit(schema.integer, _pool_size),
        "Machines kept booted ahead per image (the warm pool), so prepare hands one out "
        "instead of booting; an image file's pool_size overrides it. 0: no pool. Each "
        "settings file has its own pool: a runner with 0 leaves another runner's pool alone."),
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings) if f.name != "origins"}
# Tables people put in the settings file that belong elsewhere.
MISPLACED = {"limits": "in the settings file, limits are top-level keys (memory_max = \"8G\" "
                       "above any [table] header); [limits] belongs in image files "
                       "(images_config_dir/NAME.toml, docs/images.md)"}


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


def template() -> str:
    """The commented settings file the Debian package installs as /etc/nspawn-runner/config.toml
    (examples/nspawn-runner.toml): every key, commented out at its default, with its help."""
    import textwrap

    import tomlkit

    lines = [
        "# The settings of nspawn-runner (docs/configuration.md). Every key is optional; each one",
        "# is shown commented out at its default: uncomment a line to change it. Only top-level",
        "# keys: a [table] here is an error (per-image [limits] go in the image files,",
        "# /etc/nspawn-runner/images/NAME.toml). `nspawn-runner settings` shows the values in",
        "# effect and where each comes from; `nspawn-runner check` checks them.",
    ]
    for row in SETTINGS:
        text = row.help + (f" Environment: {row.env}." if row.env else "")
        lines += ["", *textwrap.wrap(text, 96, initial_indent="# ", subsequent_indent="# ")]
        lines.append(f"#{row.name} = {tomlkit.item(_plain(row.default)).as_string()}")
    return "\n".join(lines) + "\n"


def config_path() -> Path:
    return Path(os.environ.get("NSPAWN_RUNNER_CONFIG", layout.DEFAULT_CONFIG))


def _read(path: Path) -> dict[str, object]:
    # tomllib, not tomlkit: every stage call reads the settings, and tomlkit costs about 30 ms
    # of imports; it stays for what writes TOML and must keep comments.
    import tomllib

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
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(
            f"settings file {path} is not valid TOML: {e}; fix the syntax") from None


def load(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    path = path or config_path()
    environ = dict(os.environ) if environ is None else environ
    data = _read(path)
    parsers = {row.name: row.parse for row in SETTINGS}
    values: dict[str, object] = schema.parse_table(data, parsers, str(path), SettingsError,
                                                   misplaced=MISPLACED)
    origins = {row.name: str(path) if row.name in values else "default" for row in SETTINGS}
    for row in SETTINGS:
        if row.env and environ.get(row.env):
            try:
                values[row.name] = row.parse(environ[row.env])
            except schema.BadValue as e:
                raise SettingsError(
                    f"environment variable {row.env}={environ[row.env]!r}: {e}") from None
            origins[row.name] = row.env
    result = Settings(**values, origins=origins)  # type: ignore[arg-type]
    result.limits()  # binds are checked against root, which may come from elsewhere
    return result


def _source(cfg: Settings, row: Row) -> tuple[str, str]:
    """("default" | "file" | "environment", the file path or variable name)."""
    origin = cfg.origins.get(row.name, "default")
    if origin == "default":
        return "default", origin
    return ("environment" if origin == row.env else "file"), origin


def _plain(value: object) -> object:
    return str(value) if isinstance(value, Path) else list(value) if isinstance(
        value, tuple) else value


def effective(cfg: Settings, path: Path) -> dict[str, object]:
    """`nspawn-runner settings --json`: each value and where it came from."""
    out = {}
    for row in SETTINGS:
        source, origin = _source(cfg, row)
        out[row.name] = {"value": _plain(getattr(cfg, row.name)), "source": source,
                         "origin": origin}
    return {"file": str(path), "file_exists": path.is_file(), "settings": out}


def show(cfg: Settings, path: Path) -> str:
    """`nspawn-runner settings`: key, value (as TOML) and where it came from."""
    import tomlkit

    rows = [("KEY", "VALUE", "FROM")]
    for row in SETTINGS:
        source, origin = _source(cfg, row)
        value = tomlkit.item(_plain(getattr(cfg, row.name))).as_string()
        rows.append((row.name, value, f"environment {origin}" if source == "environment"
                     else origin))
    absent = "" if path.is_file() else " (absent: defaults and environment only)"
    return f"settings file: {path}{absent}\n" + table.render(rows)
