"""What a job's network is made of, worked out without touching the host: the settings'
parsers, zone names, the address plan, the resolvers a job gets, and the text of every file
and rule host/network.py puts in place (docs/networking.md)."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from nspawn_runner import layout
from nspawn_runner.errors import SystemFailure

MODES = ("isolated", "host", "none")
DEFAULT_IPV4_POOL = "10.223.0.0/16"
ZONE_PREFIX = "nr"  # zone names: nr + 10 hex digits; interface vz-nr... is 15 characters
BRIDGE_PREFIX = "vz-"  # what systemd-nspawn calls a zone's bridge
PREFIX_V4 = 28  # per zone: the gateway, the job and room for its service machines
PREFIX_V6 = 64
TABLE = "nspawn_runner"
DOCS = "docs/networking.md"
# Inside the machine, bound read-only. Under /etc, not /run: nspawn would make /run/systemd
# for the mount points, owned by a uid that a private user namespace cannot write, and the
# machine's systemd then fails to start. "10-" sorts before the 80-container-host0.network
# that systemd ships (networkd applies the first match).
GUEST_NETWORK_FILE = "/etc/systemd/network/10-nspawn-runner.network"
# A unit in the machine that holds its boot back until host0 is usable, then leaves a mark in
# the machine's results directory: prepare sees it without a round trip into the machine.
READY_UNIT = "nspawn-runner-network.service"
GUEST_UNIT_DIR = "/etc/systemd/system"
READY_MARK = "network-ready"
READY_TIMEOUT = 10
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


def wait_online(ipv6: bool, timeout: int, dollar: str = "$") -> str:
    """A shell command: wait until host0 is routable (with IPv6 too if `ipv6`); exit 4
    without systemd-networkd-wait-online. `dollar` is "$$" in a unit file."""
    w = f"{dollar}w"
    return ("for w in /usr/lib/systemd/systemd-networkd-wait-online "
            f'/lib/systemd/systemd-networkd-wait-online; do [ -x "{w}" ] && exec "{w}" -q '
            f"--interface=host0 --operational-state=routable -4{' -6' if ipv6 else ''} "
            f"--timeout={timeout}; done; exit 4")


def ready_unit_text(ipv6: bool) -> str:
    """Requires= networkd: an image that has it but not enabled gets it started."""
    return ("# nspawn-runner: the boot ends once this job's network is usable.\n"
            "[Unit]\nDescription=Wait until the job's network is usable\n"
            "Requires=systemd-networkd.service\nAfter=systemd-networkd.service\n"
            "Before=multi-user.target\n\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            f"TimeoutStartSec={READY_TIMEOUT + 5}\n"
            f"ExecStart=/bin/sh -c '{wait_online(ipv6, READY_TIMEOUT, '$$')}'\n"
            f"ExecStartPost=/bin/touch {layout.RESULTS_INSIDE}/{READY_MARK}\n")


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


# The host's networks, for `check`.


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
