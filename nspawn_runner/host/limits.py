"""Per-runner (and per-image) limits and isolation of job machines: resources as properties of
the machine's unit, isolation as systemd-nspawn options. Validated when the settings are read,
so a setting that would break isolation never reaches a machine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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
# Never bound into a machine: the host's root, the container engine sockets.
_FORBIDDEN_BINDS = ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd",
                    "/run/podman", "/run/dbus/system_bus_socket", "/run/systemd/private")
MAX_TASKS = 16384  # systemd caps TasksMax of machines there


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

    def unit_properties(self) -> list[str]:
        """systemd-run --property= values for the machine's unit (it holds every process of
        the machine, so these bound the whole job)."""
        props = []
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
        if self.max_job_duration:
            props.append(f"RuntimeMaxSec={self.max_job_duration}")
        return [f"--property={p}" for p in props]

    def nspawn_args(self) -> list[str]:
        args = []
        if self.private_users:
            # Ownership through idmapped mounts: the image is never chowned.
            args += ["--private-users=pick", "--private-users-ownership=auto"]
        args += [b.nspawn_arg(idmap=self.private_users) for b in self.binds]
        args += list(self.nspawn_options)
        return args


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
        raise LimitError("expected bytes with an optional K, M, G or T suffix (e.g. '8G'), "
                         "a percentage of RAM or 'infinity'")
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


def parse_bind(spec: str, root: Path) -> Bind:
    """`HOST:INSIDE[:ro|rw]`. Refuses binds that would hand a job the host: `/`, the state
    root (images, other jobs' caches and layers) or a parent of it, container engine sockets."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise LimitError(f"bind {spec!r}: expected HOST:INSIDE or HOST:INSIDE:ro|rw")
    host, inside = Path(parts[0]), parts[1]
    if not host.is_absolute() or not inside.startswith("/") or ".." in spec.split("/"):
        raise LimitError(f"bind {spec!r}: both paths must be absolute, without '..'")
    resolved = Path("/" + "/".join(p for p in parts[0].split("/") if p))  # '//', trailing '/'
    if resolved == Path("/") or inside.rstrip("/") == "":
        raise LimitError(f"bind {spec!r}: binding '/' would give jobs the host")
    if root == resolved or root.is_relative_to(resolved) or resolved.is_relative_to(root):
        raise LimitError(f"bind {spec!r}: it exposes the state root {root} (images, caches "
                         "and other jobs' layers); bind a directory outside it")
    for bad in _FORBIDDEN_BINDS:
        if resolved == Path(bad) or Path(bad).is_relative_to(resolved):
            raise LimitError(f"bind {spec!r}: it exposes {bad}, which gives jobs control of "
                             "the host")
    return Bind(resolved, inside.rstrip("/"), len(parts) == 3 and parts[2] == "ro")


def parse_nspawn_option(option: str) -> str:
    if not any(option == s or (s.endswith("=") and option.startswith(s))
               for s in SAFE_NSPAWN_OPTIONS):
        raise LimitError(f"nspawn option {option!r} is not allowed; allowed: "
                         + ", ".join(SAFE_NSPAWN_OPTIONS))
    if option.startswith("--capability=") and "all" in option.split("=", 1)[1].split(","):
        raise LimitError("nspawn option '--capability=all' would give jobs the host")
    return option
