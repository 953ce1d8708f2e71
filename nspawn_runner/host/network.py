"""Job networks. `network = "isolated"` (the default): every job's machine gets its own network
zone, a bridge `vz-<zone>` on the host that only this job's machines join, with a static /28
(and a /64 of a ULA prefix when the host has IPv6) from a pool; systemd-networkd on the host
gives the bridge its address and masquerades the zone to the world, from a `.network` file this
module writes in /run/systemd/network for that one bridge; the machine's own systemd-networkd
takes its address from a `.network` file bound into its /run/systemd/network. Static, not
DHCP: a DHCP lease took 1.5 to 4.7 s in the test bed, static addresses a few milliseconds.
An nft table keeps jobs away from the host's own services (except `network_host_ports`) and
from each other's zones. `host` shares the host's network namespace; `none` gives only `lo`.

Per job, on the host: a lease file per subnet in the runtime directory (O_EXCL: concurrent
prepares never share a subnet), the zone's .network file, the bridge (nspawn removes it with
its last machine, `release` and `gc` if nspawn was killed), and the files bound into the
machine. See docs/networking.md."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nspawn_runner import layout, log, proc
from nspawn_runner.errors import CommandError, SystemFailure
from nspawn_runner.host.backends import escape

MODES = ("isolated", "host", "none")
DEFAULT_IPV4_POOL = "10.223.0.0/16"
ZONE_PREFIX = "nr"  # zone names: nr + 10 hex digits; interface vz-nr... is 15 characters
BRIDGE_PREFIX = "vz-"  # what systemd-nspawn calls a zone's bridge
PREFIX_V4 = 28  # per zone: the gateway, the job and room for its service machines
PREFIX_V6 = 64
NETWORKD_DIR = Path("/run/systemd/network")
NETIF_LINKS = Path("/run/systemd/netif/links")  # networkd's link states (private format)
TABLE = "nspawn_runner"
DOCS = "docs/networking.md"
# Inside the machine. Its networkd reads /run/systemd/network; "10-" sorts before the
# 80-container-host0.network that systemd ships (networkd applies the first match).
GUEST_NETWORK_FILE = "/run/systemd/network/10-nspawn-runner.network"
NETWORKD_FIX = "systemctl enable --now systemd-networkd"


class BadSetting(ValueError):
    """A network setting's value is wrong; the message says what is expected."""


@dataclass(frozen=True)
class Options:
    mode: str = "isolated"
    ipv4_pool: str = DEFAULT_IPV4_POOL
    host_ports: tuple[str, ...] = ()  # "PORT/tcp" or "PORT/udp"
    dns: tuple[str, ...] = ()  # resolvers for jobs; empty: the host's (see `resolvers`)


@dataclass(frozen=True)
class Attached:
    """What `attach` set up for a machine, for `systemd-nspawn` and for `wait_usable`."""

    nspawn_options: tuple[str, ...] = ()
    zone: str = ""
    ipv6: bool = False


@dataclass(frozen=True)
class Subnet:
    index: int
    v4: ipaddress.IPv4Network
    v6: ipaddress.IPv6Network | None

    @property
    def gateway4(self) -> ipaddress.IPv4Address:
        return self.v4.network_address + 1

    @property
    def guest4(self) -> ipaddress.IPv4Address:
        return self.v4.network_address + 2


# Settings.


def parse_mode(value: str) -> str:
    if value == "private":  # the name before "none"
        return "none"
    if value == "veth":
        raise BadSetting('"veth" is gone: use "isolated" (a network zone per job)')
    if value not in MODES:
        raise BadSetting("expected one of " + ", ".join(MODES))
    return value


def parse_ipv4_pool(value: str) -> str:
    try:
        pool = ipaddress.IPv4Network(value)
    except ValueError:
        raise BadSetting(f"expected an IPv4 network such as {DEFAULT_IPV4_POOL!r}") from None
    if pool.prefixlen > PREFIX_V4 - 2 or not pool.is_private:
        raise BadSetting(f"expected a private IPv4 network of /{PREFIX_V4 - 2} or larger "
                         f"(each job takes a /{PREFIX_V4})")
    return str(pool)


def parse_host_port(value: str) -> str:
    port, _, protocol = value.partition("/")
    protocol = protocol or "tcp"
    if not port.isdigit() or not 0 < int(port) < 65536 or protocol not in ("tcp", "udp"):
        raise BadSetting(f"{value!r}: expected PORT, PORT/tcp or PORT/udp, e.g. '3142/tcp'")
    return f"{int(port)}/{protocol}"


def parse_dns(value: str) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise BadSetting(f"{value!r}: expected an IP address of a DNS server") from None
    if not _reachable_resolver(address):
        raise BadSetting(f"{value!r}: a job cannot reach a loopback or link-local address")
    return str(address)


# Names and addresses.


def zone_of(machine: str) -> str:
    """The job's zone: derived from the machine name, so that cleanup and gc find it without
    any state, and unique per job (machine names are)."""
    return ZONE_PREFIX + hashlib.blake2s(machine.encode(), digest_size=5).hexdigest()


def bridge_of(zone: str) -> str:
    return BRIDGE_PREFIX + zone


def networkd_file(zone: str) -> Path:
    return NETWORKD_DIR / f"10-nspawn-runner-{zone}.network"


def files_dir(machine: str) -> Path:
    """The files bound into the machine (read-only): its .network file and resolv.conf."""
    return layout.RUNTIME_DIR / f"{machine}.net"


def lease_path(index: int) -> Path:
    return layout.RUNTIME_DIR / f"subnet-{index}.lease"


def ula_prefix(machine_id: str | None = None) -> ipaddress.IPv6Network:
    """This host's /48 of unique local addresses (RFC 4193: fd + 40 bits that differ per
    host), derived from its machine id."""
    if machine_id is None:
        try:
            machine_id = Path("/etc/machine-id").read_text().strip()
        except OSError:
            machine_id = ""
    digest = hashlib.sha256(f"nspawn-runner:{machine_id}".encode()).digest()
    return ipaddress.IPv6Network((b"\xfd" + digest[:5] + bytes(10), 48))


def subnet(pool: str, index: int, ipv6: bool, machine_id: str | None = None) -> Subnet:
    v4pool = ipaddress.IPv4Network(pool)
    v4 = ipaddress.IPv4Network((int(v4pool.network_address) + (index << (32 - PREFIX_V4)),
                                PREFIX_V4))
    v6 = None
    if ipv6:
        base = int(ula_prefix(machine_id).network_address)
        v6 = ipaddress.IPv6Network((base + (index << (128 - PREFIX_V6)), PREFIX_V6))
    return Subnet(index, v4, v6)


def subnet_count(pool: str) -> int:
    return 1 << (PREFIX_V4 - ipaddress.IPv4Network(pool).prefixlen)


def host_has_ipv6(routes: str | None = None) -> bool:
    """Whether the host has an IPv6 default route (not an unreachable one): only then do jobs
    get IPv6 addresses, so that programs do not try a v6 path that cannot work."""
    if routes is None:
        try:
            routes = Path("/proc/net/ipv6_route").read_text()
        except OSError:
            return False
    for line in routes.splitlines():
        fields = line.split()
        # dest, dest prefix, src, src prefix, next hop, metric, refs, use, flags, device
        if (len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00"
                and fields[9] != "lo" and not int(fields[8], 16) & 0x0200):  # RTF_REJECT
            return True
    return False


# Resolvers.


def _reachable_resolver(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (address.is_loopback or address.is_link_local or address.is_unspecified)


def parse_resolv_conf(text: str) -> tuple[list[str], list[str]]:
    """(nameservers, the other lines a job keeps: search, domain, options)."""
    servers, other = [], []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            servers.append(words[1])
        elif words and words[0] in ("search", "domain", "options"):
            other.append(" ".join(words))
    return servers, other


def _usable(servers: list[str]) -> list[str]:
    out = []
    for server in servers:
        try:
            address = ipaddress.ip_address(server.split("%")[0])
        except ValueError:
            continue
        if _reachable_resolver(address):
            out.append(str(address))
    return out


def resolvers(dns: tuple[str, ...], etc: Path = Path("/etc/resolv.conf"),
              uplink: Path = Path("/run/systemd/resolve/resolv.conf")) -> tuple[str, str]:
    """The resolv.conf a job gets and where its servers came from. A loopback stub on the host
    (systemd-resolved's 127.0.0.53, a local dnsmasq) is no use inside a machine: then the
    upstream servers resolved knows (its uplink file), else the `network_dns` setting."""
    if dns:
        return "".join(f"nameserver {s}\n" for s in dns), "network_dns"
    try:
        text = etc.read_text()
    except OSError as e:
        raise SystemFailure(f"cannot read {etc} ({e.strerror}): set network_dns to the DNS "
                            f"servers jobs should use ({DOCS})") from None
    servers, other = parse_resolv_conf(text)
    usable = _usable(servers)
    source = str(etc)
    if not usable and uplink.is_file():
        servers, other = parse_resolv_conf(uplink.read_text())
        usable = _usable(servers)
        source = f"{uplink} (systemd-resolved's upstream servers; {etc} names its stub)"
    if not usable:
        named = ", ".join(servers) or "none"
        raise SystemFailure(
            f"the host's resolvers ({named}, in {etc}) are loopback addresses a job cannot "
            "reach, and systemd-resolved lists no upstream servers: set network_dns to the "
            f"DNS servers jobs should use ({DOCS})")
    # Three servers: as many as the C library reads.
    lines = [*other, *(f"nameserver {s}" for s in usable[:3])]
    return "\n".join(lines) + "\n", source


# Files.


def host_network_text(zone: str, sub: Subnet) -> str:
    """The zone's bridge on the host: static addresses, masquerading (networkd then turns on
    forwarding), no DHCP or router advertisements (the machine's address is static)."""
    v6 = "" if sub.v6 is None else (f"\n[Address]\nAddress={sub.v6.network_address + 1}/"
                                    f"{PREFIX_V6}\nDuplicateAddressDetection=none\n")
    return (f"# nspawn-runner: the network zone of one job; removed with the job.\n"
            f"[Match]\nName={bridge_of(zone)}\n\n"
            "[Link]\nRequiredForOnline=no\n\n"
            "[Network]\nConfigureWithoutCarrier=yes\nLinkLocalAddressing=no\n"
            "IPv6AcceptRA=no\nLLDP=no\nEmitLLDP=no\n"
            f"IPMasquerade={'ipv4' if sub.v6 is None else 'both'}\n\n"
            f"[Address]\nAddress={sub.gateway4}/{PREFIX_V4}\n{v6}")


def guest_network_text(sub: Subnet) -> str:
    gateway6 = "" if sub.v6 is None else f"Gateway={sub.v6.network_address + 1}\n"
    v6 = "" if sub.v6 is None else (f"\n[Address]\nAddress={sub.v6.network_address + 2}/"
                                    f"{PREFIX_V6}\nDuplicateAddressDetection=none\n")
    return ("# nspawn-runner: this machine's address in its job's network zone.\n"
            "[Match]\nName=host0\n\n"
            # No link-local address: its duplicate detection held "configured" back by 1 s.
            "[Network]\nDHCP=no\nIPv6AcceptRA=no\nLinkLocalAddressing=no\n"
            f"Gateway={sub.gateway4}\n{gateway6}\n"
            f"[Address]\nAddress={sub.guest4}/{PREFIX_V4}\n{v6}")


def ruleset(host_ports: tuple[str, ...]) -> str:
    """One table for all zones (interfaces vz-nr*), replaced atomically. Jobs reach the world
    (forwarded and masqueraded); the host's own addresses only for DHCP-free basics (IPv6
    neighbour discovery) and the allowed ports; no connection starts into a zone, so neither
    other jobs nor the host's other networks reach a job's ports. A drop in any table is
    final, so another firewall's accept cannot undo these."""
    zones = f'"{BRIDGE_PREFIX}{ZONE_PREFIX}*"'
    allow = []
    for protocol in ("tcp", "udp"):
        ports = [p.split("/")[0] for p in host_ports if p.endswith(f"/{protocol}")]
        if ports:
            allow.append(f"\t\t{protocol} dport {{ {', '.join(ports)} }} accept\n")
    return (f"table inet {TABLE}\ndelete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            "\tchain input {\n"
            "\t\ttype filter hook input priority filter - 5; policy accept;\n"
            f"\t\tiifname {zones} jump from_job\n"
            "\t}\n"
            "\tchain from_job {\n"
            "\t\tct state established,related accept\n"
            "\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n"
            f"{''.join(allow)}"
            "\t\tmeta l4proto tcp reject with tcp reset\n"
            "\t\treject with icmpx port-unreachable\n"
            "\t}\n"
            "\tchain forward {\n"
            "\t\ttype filter hook forward priority filter - 5; policy accept;\n"
            f"\t\toifname {zones} ct state established,related accept\n"
            f"\t\toifname {zones} reject with icmpx admin-prohibited\n"
            "\t}\n"
            "}\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# The host's side.


def apply_ruleset(host_ports: tuple[str, ...]) -> None:
    """(Re)load the table. Every prepare does it: an admin's `nft flush ruleset` (Debian's
    nftables.service does one) would otherwise leave jobs unfiltered until the next reboot."""
    with tempfile.TemporaryFile() as rules:
        rules.write(ruleset(host_ports).encode())
        rules.seek(0)
        try:
            proc.run(["nft", "-f", "-"], stdin=rules)
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
        _write_atomic(networkd_file(zone), host_network_text(zone, sub))
        _reload_networkd()
        # Made here rather than by nspawn, so that networkd has configured it (addresses,
        # masquerading) before the machine's first packet; nspawn joins an existing bridge.
        proc.run(["ip", "link", "add", bridge_of(zone), "type", "bridge"])
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
    ), zone, ipv6)


# After the boot, inside the machine: prepare returns only once the job's first command can
# use the network. networkd in the machine applies a static address in milliseconds. One line:
# systemd-run's transient unit file takes no newlines in a command's arguments.
_READY = ("systemctl -q is-active systemd-networkd.service || exit 3; "
          "for w in /usr/lib/systemd/systemd-networkd-wait-online "
          "/lib/systemd/systemd-networkd-wait-online; do "
          '[ -x "$w" ] && exec "$w" -q --interface=host0 --operational-state=routable -4 $2 '
          '--timeout="$1"; done; exit 4')


def wait_usable(machine: str, attached: Attached, image: str, timeout: int = 10) -> None:
    if not attached.zone:
        return
    result = proc.run(["systemd-run", "--quiet", f"--machine={machine}", "--wait", "--pipe",
                       "--collect", "--service-type=exec", "--", "/bin/sh", "-c", _READY, "sh",
                       str(timeout), "-6" if attached.ipv6 else "-4"],
                      check=False, capture=True, timeout=timeout + 30)
    if result.returncode == 0:
        return
    if result.returncode in (3, 4):
        raise SystemFailure(
            f"image {image!r} does not run systemd-networkd, which a job with network = "
            f'"isolated" needs for its address: images made by chroot-create have it; for '
            f"another image: systemctl --root=IMAGE enable systemd-networkd, or give the image "
            f'network = "host" in its file\'s [limits] ({DOCS})')
    raise SystemFailure(f"the network of machine {machine} was not usable within {timeout}s "
                        f"({result.stderr.strip() or f'status {result.returncode}'}); see "
                        f"`networkctl status {bridge_of(attached.zone)}` ({DOCS})")


def _delete_bridge(zone: str) -> bool:
    bridge = bridge_of(zone)
    if not os.path.lexists(f"/sys/class/net/{bridge}"):
        return False
    result = proc.run(["ip", "link", "delete", bridge], check=False)
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


def host_ipv4_networks(routes: str | None = None) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks the host routes, but for default routes and its jobs' zones."""
    if routes is None:
        try:
            routes = Path("/proc/net/route").read_text()
        except OSError:
            return []
    out = []
    for line in routes.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[0].startswith(f"{BRIDGE_PREFIX}{ZONE_PREFIX}"):
            continue
        # Little-endian hex, as the kernel prints them.
        dest, mask = (ipaddress.IPv4Address(bytes.fromhex(f)[::-1])
                      for f in (fields[1], fields[7]))
        if int(mask):
            out.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return out


def pool_conflicts(pool: str, networks: list[str]) -> list[str]:
    net = ipaddress.IPv4Network(pool)
    return [n for n in networks if ipaddress.IPv4Network(n).overlaps(net)]


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
