"""Job networks on the host. `network = "isolated"` (the default): every job's machine gets
its own network zone, a bridge `vz-<zone>` that only this job's machines join, with a static /28
(and a /64 of a ULA prefix when the host has IPv6) from a pool; systemd-networkd on the host
gives the bridge its address and masquerades the zone to the world, from a `.network` file
written in /run/systemd/network for that one bridge; the machine's own systemd-networkd takes
its address from a `.network` file bound into its /run/systemd/network. Static, not DHCP: a
DHCP lease took 1.5 to 4.7 s in the test bed, static addresses a few milliseconds. An nft table
keeps jobs away from the host's own services (except `network_host_ports`) and from each
other's zones. `host` shares the host's network namespace; `none` gives only `lo`.

Per job, on the host: a lease file per subnet in the runtime directory (O_EXCL: concurrent
prepares never share a subnet), the zone's .network file, the bridge (nspawn removes it with
its last machine; `release`, and `collect` for gc, if nspawn was killed), and the files bound
into the machine. What those files say is host/netplan.py's. See docs/networking.md."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nspawn_runner import layout, log, proc
from nspawn_runner.errors import CommandError, SystemFailure
from nspawn_runner.host.backends import escape
from nspawn_runner.host.netplan import (
    BRIDGE_PREFIX,
    DOCS,
    GUEST_NETWORK_FILE,
    GUEST_UNIT_DIR,
    NETWORKD_FIX,
    READY_TIMEOUT,
    READY_UNIT,
    TABLE,
    ZONE_PREFIX,
    Options,
    bridge_of,
    guest_network_text,
    host_has_ipv6,
    host_network_text,
    ready_unit_text,
    resolvers,
    ruleset,
    subnet,
    subnet_count,
    wait_online,
    zone_of,
)

NETWORKD_DIR = Path("/run/systemd/network")
NETIF_LINKS = Path("/run/systemd/netif/links")  # networkd's link states (private format)


@dataclass(frozen=True)
class Attached:
    """What `attach` set up for a machine, for `systemd-nspawn` and for `wait_usable`."""

    nspawn_options: tuple[str, ...] = ()
    zone: str = ""
    ipv6: bool = False


def networkd_file(zone: str) -> Path:
    return NETWORKD_DIR / f"10-nspawn-runner-{zone}.network"


def files_dir(machine: str) -> Path:
    """The files bound into the machine (read-only): its .network file and resolv.conf."""
    return layout.RUNTIME_DIR / f"{machine}.net"


def lease_path(index: int) -> Path:
    return layout.RUNTIME_DIR / f"subnet-{index}.lease"

def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# The host's side.


def _tool(name: str) -> str:
    """gitlab-runner's PATH may lack the sbin directories, where Debian puts nft."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


def apply_ruleset(host_ports: tuple[str, ...]) -> None:
    """(Re)load the table. Every prepare does it: an admin's `nft flush ruleset` (Debian's
    nftables.service does one) would otherwise leave jobs unfiltered until the next reboot."""
    with tempfile.TemporaryFile() as rules:
        rules.write(ruleset(host_ports).encode())
        rules.seek(0)
        try:
            proc.run([_tool("nft"), "-f", "-"], stdin=rules)
        except CommandError as e:
            fix = ("apt-get install nftables" if e.returncode == 127
                   else "check that the kernel has nf_tables")
            raise SystemFailure(f"cannot load the jobs' firewall table inet {TABLE} "
                                f"({e.stderr.strip() or e}): {fix} ({DOCS})") from None


def _claim(machine: str, pool: str) -> int:
    """A free subnet index, claimed by creating its lease file exclusively."""
    count = subnet_count(pool)
    start = int(zone_of(machine)[len(ZONE_PREFIX):], 16) % count
    layout.RUNTIME_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    for step in range(count):
        index = (start + step) % count
        try:
            fd = os.open(lease_path(index), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(machine)
        return index
    raise SystemFailure(f"all {count} job subnets of network_ipv4_pool {pool} are in use: "
                        "use a larger pool, or run fewer jobs at once")


def leases() -> dict[int, str]:
    """Subnet index -> the machine holding it."""
    out = {}
    for path in layout.RUNTIME_DIR.glob("subnet-*.lease"):
        index = path.name.removeprefix("subnet-").removesuffix(".lease")
        try:
            out[int(index)] = path.read_text().strip()
        except (OSError, ValueError):
            continue
    return out


def _reload_networkd() -> None:
    try:
        proc.run(["networkctl", "reload"], timeout=30)
    except CommandError as e:
        raise SystemFailure(
            f"systemd-networkd does not answer ({e.stderr.strip() or e}); jobs with network = "
            f'"isolated" need it on the host: {NETWORKD_FIX} ({DOCS}), or set network = '
            '"host" to share the host\'s network') from None


def _link_state(bridge: str) -> dict[str, str]:
    try:
        index = Path(f"/sys/class/net/{bridge}/ifindex").read_text().strip()
        text = (NETIF_LINKS / index).read_text()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _wait_configured(zone: str, timeout: float) -> None:
    bridge = bridge_of(zone)
    deadline = time.monotonic() + timeout
    state: dict[str, str] = {}
    while time.monotonic() < deadline:
        state = _link_state(bridge)
        if state.get("ADMIN_STATE") in ("configured", "failed", "unmanaged", "linger"):
            break
        time.sleep(0.002)
    applied = state.get("NETWORK_FILE", "")
    if applied and applied != str(networkd_file(zone)):
        raise SystemFailure(f"systemd-networkd applies {applied} to {bridge}, not "
                            f"{networkd_file(zone)}: make that file match fewer interfaces "
                            f"(nspawn-runner's zones are {BRIDGE_PREFIX}{ZONE_PREFIX}*; {DOCS})")
    if state.get("ADMIN_STATE") != "configured":
        raise SystemFailure(f"systemd-networkd did not configure {bridge} within {timeout:.0f}s "
                            f"(state {state.get('ADMIN_STATE', 'unknown')!r}); see "
                            f"`networkctl status {bridge}` and `journalctl -u systemd-networkd`")
    if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
        raise SystemFailure("IPv4 forwarding is off (net.ipv4.ip_forward = 0) although "
                            f"systemd-networkd configured {bridge} with masquerading: "
                            f"something resets it; see {DOCS}")


def attach(machine: str, options: Options, timeout: float = 10) -> Attached:
    """Before the boot: what the machine's network needs on the host, and the nspawn options
    that join it. On failure, nothing is left."""
    if options.mode == "host":
        return Attached()
    if options.mode == "none":
        return Attached(("--private-network",))
    start = time.monotonic()
    zone = zone_of(machine)
    try:
        resolv, _source = resolvers(options.dns)
        apply_ruleset(options.host_ports)
        ipv6 = host_has_ipv6()
        sub = subnet(options.ipv4_pool, _claim(machine, options.ipv4_pool), ipv6)
        files = files_dir(machine)
        files.mkdir(mode=0o755, exist_ok=True)
        _write_atomic(files / "host0.network", guest_network_text(sub))
        _write_atomic(files / "resolv.conf", resolv)
        _write_atomic(files / READY_UNIT, ready_unit_text(ipv6))
        _write_atomic(files / "multi-user.conf", f"[Unit]\nWants={READY_UNIT}\n")
        _write_atomic(networkd_file(zone), host_network_text(zone, sub))
        _reload_networkd()
        # Made here rather than by nspawn, so that networkd has configured it (addresses,
        # masquerading) before the machine's first packet; nspawn joins an existing bridge.
        proc.run([_tool("ip"), "link", "add", bridge_of(zone), "type", "bridge"])
        _wait_configured(zone, timeout)
    except BaseException:
        release(machine)
        raise
    log.debug(f"network zone {zone}: {sub.v4}{f' {sub.v6}' if sub.v6 else ''} ready in "
              f"{time.monotonic() - start:.3f}s")
    return Attached((
        f"--network-zone={zone}",
        f"--bind-ro={escape(files / 'host0.network')}:{GUEST_NETWORK_FILE}",
        f"--bind-ro={escape(files / 'resolv.conf')}:/etc/resolv.conf",
        f"--bind-ro={escape(files / READY_UNIT)}:{GUEST_UNIT_DIR}/{READY_UNIT}",
        f"--bind-ro={escape(files / 'multi-user.conf')}:"
        f"{GUEST_UNIT_DIR}/multi-user.target.d/10-nspawn-runner.conf",
    ), zone, ipv6)


def wait_usable(machine: str, attached: Attached, image: str, ready: Callable[[], bool],
                timeout: int = 2) -> None:
    """After the boot: return once the job's first command can use the network. Usually the
    machine's READY_UNIT has said so already (networkd applies a static address in
    milliseconds, before the boot ends; `ready` looks for its READY_MARK inside the machine);
    else ask inside, and say what is missing."""
    if not attached.zone or ready():
        return
    # One line: systemd-run's transient unit file takes no newlines in arguments.
    script = ("systemctl -q is-active systemd-networkd.service || exit 3; "
              + wait_online(attached.ipv6, timeout))
    result = proc.run(["systemd-run", "--quiet", f"--machine={machine}", "--wait", "--pipe",
                       "--collect", "--service-type=exec", "--", "/bin/sh", "-c", script],
                      check=False, capture=True, timeout=timeout + 30)
    if result.returncode == 0:
        return
    if result.returncode in (3, 4):
        raise SystemFailure(
            f"image {image!r} does not run systemd-networkd, which a job with network = "
            f'"isolated" needs for its address: images made by chroot-create have it; for '
            f"another image: systemctl --root=IMAGE enable systemd-networkd, or give the image "
            f'network = "host" in its file\'s [limits] ({DOCS})')
    raise SystemFailure(f"the network of machine {machine} was not usable within "
                        f"{READY_TIMEOUT}s ({result.stderr.strip() or result.returncode}); see "
                        f"`networkctl status {bridge_of(attached.zone)}` ({DOCS})")


def _delete_bridge(zone: str) -> bool:
    bridge = bridge_of(zone)
    if not os.path.lexists(f"/sys/class/net/{bridge}"):
        return False
    result = proc.run([_tool("ip"), "link", "delete", bridge], check=False)
    return result.returncode == 0


def release(machine: str) -> None:
    """Remove what `attach` made for `machine`. Safe for a machine that has none, and twice.
    After the machine is gone: the bridge first, so that networkd drops its addresses and
    masquerading before the subnet can be handed out again."""
    zone = zone_of(machine)
    _delete_bridge(zone)
    networkd_file(zone).unlink(missing_ok=True)
    files = files_dir(machine)
    if files.is_dir():
        for path in files.iterdir():
            path.unlink(missing_ok=True)
        files.rmdir()
    for index, owner in leases().items():
        if owner == machine:
            lease_path(index).unlink(missing_ok=True)


def _ports(bridge: str) -> list[str]:
    try:
        return os.listdir(f"/sys/class/net/{bridge}/brif")
    except OSError:
        return []


def _has_ports(machine: str) -> bool:
    """Whether a machine is still on the zone (whatever gc was told about it)."""
    return bool(_ports(bridge_of(zone_of(machine))))


def _age(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_mtime
    except OSError:
        return 0.0


def collect(in_use: set[str], grace: float) -> list[str]:
    """gc: remove the network of every machine not `in_use` (leases, files, bridges whose
    machine was killed with nspawn). Returns one line per thing removed."""
    now = time.time()
    removed = []
    zones_in_use = {zone_of(m) for m in in_use}
    for index, owner in sorted(leases().items()):
        if owner in in_use or _age(lease_path(index), now) < grace or _has_ports(owner):
            continue
        release(owner)
        removed.append(f"network of machine {owner} (subnet {index})")
    for path in sorted(layout.RUNTIME_DIR.glob("*.net")) if layout.RUNTIME_DIR.is_dir() else []:
        machine = path.name.removesuffix(".net")
        if machine not in in_use and _age(path, now) >= grace and not _has_ports(machine):
            release(machine)
            removed.append(f"network files {path}")
    links = Path("/sys/class/net")
    for link in sorted(links.glob(f"{BRIDGE_PREFIX}{ZONE_PREFIX}*")):
        zone = link.name.removeprefix(BRIDGE_PREFIX)
        # A bridge with a port has a live machine on it, whoever it belongs to.
        if zone in zones_in_use or _ports(link.name):
            continue
        if _delete_bridge(zone):
            removed.append(f"bridge {link.name}")
    for path in sorted(NETWORKD_DIR.glob("10-nspawn-runner-*.network")):
        zone = path.name.removeprefix("10-nspawn-runner-").removesuffix(".network")
        if zone not in zones_in_use and _age(path, now) >= grace:
            path.unlink(missing_ok=True)
            removed.append(f"networkd file {path}")
    return removed

# For `check`.


def networkd_active() -> bool:
    return proc.run(["systemctl", "is-active", "--quiet", "systemd-networkd.service"],
                    check=False).returncode == 0

# Runs in a job's machine: resolve the name, then open a TCP connection (bash's /dev/tcp:
# minimal images have no curl).
_PROBE = ('set -- "$1" "$2" $(getent ahosts "$1"); [ -n "$3" ] || exit 5; echo "$3"; '
          "exec timeout 10 bash -c 'exec 3<>\"/dev/tcp/$0/$1\"' \"$3\" \"$2\"")


def probe(machine: str, host: str, port: int) -> str:
    """From inside `machine`: resolve `host` and connect to it on `port`. Returns the address
    it connected to; raises SystemFailure saying which step failed."""
    result = proc.run(["systemd-run", "--quiet", f"--machine={machine}", "--wait", "--pipe",
                       "--collect", "--service-type=exec", "--", "/bin/sh", "-c", _PROBE, "sh",
                       host, str(port)], check=False, capture=True, timeout=60)
    address = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    if result.returncode == 0:
        return address
    if result.returncode == 5:
        raise SystemFailure(f"a job's machine could not resolve {host!r}")
    raise SystemFailure(f"a job's machine resolved {host!r} to {address or '?'} but could not "
                        f"connect to port {port} ({result.stderr.strip() or 'timed out'})")
