"""Per-runner (and per-image) limits and isolation of job machines: resources as properties of
the machine's unit, isolation as systemd-nspawn options. Validated when the settings are read,
so a setting that would break isolation never reaches a machine."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nspawn_runner import layout, schema
from nspawn_runner.host import netplan
from nspawn_runner.host.backends import escape

_SIZE = re.compile(r"^[0-9]+[KMGT]?$|^[0-9]{1,3}%$|^infinity$")
_PERCENT = re.compile(r"^[0-9]{1,5}%$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# nspawn options an admin may add. Everything that changes what the machine is (image, root,
# network, user namespace, binds) has its own setting; the rest could break isolation.
SAFE_NSPAWN_OPTIONS = (
    "--capability=", "--drop-capability=", "--setenv=", "--tmpfs=", "--inaccessible=",
    "--rlimit=", "--oom-score-adjust=", "--cpu-affinity=", "--timezone=", "--resolv-conf=",
    "--system-call-filter=", "--no-new-privileges=", "--read-only",
)
# Host paths never bound into a machine, nor a directory above one, nor anything below one;
# with the reason the message gives.
_CONTROL = "gives jobs control of the host"
NEVER_BIND: dict[str, str] = {
    "/proc": "the host's processes and kernel settings",
    "/sys": "the host's kernel and devices",
    "/dev": "the host's devices (disks among them)",
    "/etc/gitlab-runner": "gitlab-runner's config.toml with every runner's token",
    "/root": "root's home with the host's keys and credentials",
    os.fspath(layout.RUNTIME_DIR): "the driver's state of every running job",
    "/var/run/docker.sock": _CONTROL, "/run/docker.sock": _CONTROL,
    "/run/containerd": _CONTROL, "/run/podman": _CONTROL,
    "/run/dbus/system_bus_socket": _CONTROL, "/run/systemd/private": _CONTROL,
}
# Paths inside every machine that a bind must not cover, or hide: systemd's own, and the
# driver's (builds_dir and cache_dir are added from the settings).
NEVER_BIND_ONTO: dict[str, str] = {
    "/proc": "systemd mounts the machine's own /proc there",
    "/sys": "systemd mounts the machine's own /sys there",
    "/dev": "systemd makes the machine's own /dev there",
    layout.RESULTS_INSIDE: "where the driver reads each step's exit status",
    layout.GITLAB_RUNNER_INSIDE: "where the driver binds the gitlab-runner helper",
}
# What the state root may not be: system directories whose contents it would mix with images,
# caches and job layers (and that `chroot-remove` or `gc` would then walk).
_SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64",
                "/libx32", "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv",
                "/sys", "/tmp", "/usr", "/usr/local", "/var", "/var/cache", "/var/lib",
                "/var/log", "/var/tmp", "/var/lib/machines")
_NOT_UNDER = ("/proc", "/sys", "/dev", "/etc", "/usr", "/boot", "/bin", "/sbin", "/lib")
MAX_TASKS = 16384  # systemd caps TasksMax of machines there
# Capabilities of nspawn's default set that a CI job has no use for, dropped unless an admin
# gives them back with nspawn_options = ["--capability=..."] (docs/security.md says why each).
DROPPED_CAPABILITIES = ("CAP_AUDIT_CONTROL", "CAP_LINUX_IMMUTABLE")
# Host devices an admin may hand to jobs (settings or an image file's [limits]): character
# devices that give no access to host storage or memory.
ALLOWED_DEVICES = ("/dev/fuse", "/dev/kvm", "/dev/net/tun")
# Units of a Debian guest a CI job has no use for, masked at boot (systemd.mask= on the guest
# init's command line): together about 100 ms of a 350 ms boot in the test bed, and no job
# step waits for a timer's apt run to release the dpkg lock. docs/performance.md says
# what each one does; `boot_mask` replaces the list.
BOOT_MASK = (
    "console-getty.service", "getty.target",  # login prompts on a console no one reads
    "systemd-update-utmp.service", "systemd-update-utmp-runlevel.service",  # `who -b`, `last`
    "systemd-journal-flush.service",  # the journal stays in /run: it ends with the machine
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount",
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
    "e2scrub_all.timer", "systemd-tmpfiles-clean.timer",
)
_UNIT = re.compile(r"^[A-Za-z0-9@_.:\\-]+\.(service|socket|target|timer|mount|automount|path|"
                   r"swap|slice|scope|device)$")


class LimitError(ValueError):
    """A limit's value is wrong; the message says why and what to do."""


@dataclass(frozen=True)
class Bind:
    host: Path
    inside: str
    read_only: bool

    def nspawn_arg(self, idmap: bool = False) -> str:
        opt = "--bind-ro" if self.read_only else "--bind"
        return f"{opt}={escape(self.host)}:{escape(self.inside)}{':idmap' if idmap else ''}"


@dataclass(frozen=True)
class Limits:
    cpu_weight: int = 0  # 0: unset
    cpu_quota: str = ""
    memory_high: str = ""
    memory_max: str = ""
    tasks_max: int = 0
    max_job_duration: int = 0  # seconds; 0: unlimited
    network: str = "isolated"  # host/network.py makes the machine's network
    user: str = "root"
    private_users: bool = False
    binds: tuple[Bind, ...] = ()
    nspawn_options: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    suppress_sync: bool = False
    boot_mask: tuple[str, ...] = BOOT_MASK

    def unit_properties(self, runtime_max: int = 0) -> list[str]:
        """systemd-run --property= values for the machine's unit (it holds every process of
        the machine, so these bound the whole job). `runtime_max`: RuntimeMaxSec, the job's
        own bound; max_job_duration when it is 0."""
        props = [f"DeviceAllow={d} rwm" for d in self.devices]
        if self.cpu_weight:
            props.append(f"CPUWeight={self.cpu_weight}")
        if self.cpu_quota:
            props.append(f"CPUQuota={self.cpu_quota}")
        if self.memory_high:
            props.append(f"MemoryHigh={self.memory_high}")
        if self.memory_max:
            props.append(f"MemoryMax={self.memory_max}")
        if self.tasks_max:
            props.append(f"TasksMax={self.tasks_max}")
        if runtime_max or self.max_job_duration:
            props.append(f"RuntimeMaxSec={runtime_max or self.max_job_duration}")
        return [f"--property={p}" for p in props]

    def nspawn_args(self) -> list[str]:
        args = []
        if self.private_users:
            # Ownership through idmapped mounts: the image is never chowned.
            args += ["--private-users=pick", "--private-users-ownership=auto"]
        if self.suppress_sync:
            args.append("--suppress-sync=yes")
        args += [b.nspawn_arg(idmap=self.private_users) for b in self.binds]
        args += [f"--bind={escape(d)}" for d in self.devices]
        given = {c.upper() for o in self.nspawn_options if o.startswith("--capability=")
                 for c in o.split("=", 1)[1].split(",")}
        dropped = [c for c in DROPPED_CAPABILITIES if c not in given]
        if dropped:
            args.append("--drop-capability=" + ",".join(dropped))
        args += list(self.nspawn_options)
        return args

    def init_args(self) -> list[str]:
        """Arguments for the guest's init: systemd reads its command line there in a
        container."""
        return [f"systemd.mask={unit}" for unit in self.boot_mask]


def parse_cpu_weight(value: int) -> int:
    if not 0 <= value <= 10000:
        raise LimitError("expected 1 to 10000 (0: unset)")
    return value


def parse_percent(value: str) -> str:
    if value and not _PERCENT.match(value):
        raise LimitError("expected a percentage such as '200%' (two CPUs)")
    return value


def parse_size(value: str) -> str:
    if value and not _SIZE.match(value):
        raise LimitError(f"expected {schema.SIZE_SYNTAX}, a percentage of RAM or 'infinity'")
    return value


def parse_tasks(value: int) -> int:
    if not 0 <= value <= MAX_TASKS:
        raise LimitError(f"expected 1 to {MAX_TASKS} (systemd's cap for machines; 0: unset)")
    return value


def parse_network(value: str) -> str:
    try:
        return netplan.parse_mode(value)
    except netplan.BadSetting as e:
        raise LimitError(str(e)) from None


def parse_user(value: str) -> str:
    if not _USER.match(value):
        raise LimitError("expected a user name: lower-case letters, digits, '_' and '-'")
    return value


def _normal(path: str) -> Path:
    """`path` without '//' and a trailing '/'."""
    return Path("/" + "/".join(p for p in path.split("/") if p))


def _touches(path: Path, other: Path) -> bool:
    """`path` is `other`, above it or below it."""
    return path == other or other.is_relative_to(path) or path.is_relative_to(other)


def parse_bind(spec: str, root: Path, inside_reserved: Sequence[str] = ()) -> Bind:
    """`HOST:INSIDE[:ro|rw]`. Refuses binds that would hand a job the host: `/`, the state
    root (images, other jobs' caches and layers) and what NEVER_BIND lists, a directory above
    one of them or anything below, device nodes; and binds onto NEVER_BIND_ONTO and
    `inside_reserved` (builds_dir, cache_dir) inside. Each refusal names its rule."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise LimitError(f"bind {spec!r}: expected HOST:INSIDE or HOST:INSIDE:ro|rw")
    host, inside = Path(parts[0]), parts[1]
    if not host.is_absolute() or not inside.startswith("/") or ".." in spec.split("/"):
        raise LimitError(f"bind {spec!r}: both paths must be absolute, without '..'")
    resolved = _normal(parts[0])
    target = _normal(inside)
    if resolved == Path("/") or target == Path("/"):
        raise LimitError(f"bind {spec!r}: binding '/' would give jobs the host")
    if _touches(resolved, root):
        raise LimitError(f"bind {spec!r}: it exposes the state root {root} (images, caches "
                         "and other jobs' layers); bind a directory outside it")
    for bad, why in NEVER_BIND.items():
        if _touches(resolved, Path(bad)):
            raise LimitError(f"bind {spec!r}: it exposes {bad} ({why}); binds of it, of a "
                             "directory above it or of anything below it are refused")
    try:
        mode = os.stat(resolved).st_mode
    except OSError:
        mode = 0
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        raise LimitError(f"bind {spec!r}: {resolved} is a device node; devices are not bound "
                         "into jobs (a disk or a terminal of the host would be theirs)")
    reserved = {**NEVER_BIND_ONTO, **{p: "a path the driver binds into every machine"
                                      for p in inside_reserved if p}}
    for bad, why in reserved.items():
        if _touches(target, Path(bad)):
            raise LimitError(f"bind {spec!r}: inside the machine it covers {bad} ({why}); "
                             "bind onto another directory")
    return Bind(resolved, os.fspath(target), len(parts) == 3 and parts[2] == "ro")


def parse_state_root(path: Path) -> Path:
    """The state root: not `/`, not a system directory, not inside /etc, /usr, /proc..."""
    text = os.fspath(_normal(os.fspath(path)))
    if text in _SYSTEM_DIRS or any(Path(text).is_relative_to(d) for d in _NOT_UNDER):
        raise LimitError(f"{text} is a system directory; the state root holds images, caches "
                         "and job layers that chroot-remove and gc delete: use a directory of "
                         "its own such as /var/lib/nspawn-runner")
    return Path(text)


def parse_device(path: str) -> str:
    if path not in ALLOWED_DEVICES:
        raise LimitError(f"device {path!r} is not allowed; allowed: " + ", ".join(ALLOWED_DEVICES)
                         + " (block devices and others would give jobs the host's storage)")
    return path


def parse_unit(unit: str) -> str:
    if not _UNIT.match(unit):
        raise LimitError(f"{unit!r} is not a unit name such as 'getty.target' or "
                         "'apt-daily.timer'")
    return unit


def parse_nspawn_option(option: str) -> str:
    if not any(option == s or (s.endswith("=") and option.startswith(s))
               for s in SAFE_NSPAWN_OPTIONS):
        raise LimitError(f"nspawn option {option!r} is not allowed; allowed: "
                         + ", ".join(SAFE_NSPAWN_OPTIONS))
    if option.startswith("--capability=") and "all" in option.split("=", 1)[1].split(","):
        raise LimitError("nspawn option '--capability=all' would give jobs the host")
    return option
