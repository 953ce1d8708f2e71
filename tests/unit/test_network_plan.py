"""host/netplan.py without a host: settings parsers, names, the address plan, resolv.conf
detection and the files and rules host/network.py writes (tests/integration/test_network.py
runs them on real systemd)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from nspawn_runner import settings
from nspawn_runner.errors import SystemFailure
from nspawn_runner.host import netplan as network
from nspawn_runner.settings import SettingsError


def test_modes() -> None:
    assert [network.parse_mode(m) for m in ("isolated", "host", "none")] == list(network.MODES)
    assert network.parse_mode("private") == "none"  # the old name
    with pytest.raises(network.BadSetting, match='"veth" is gone: use "isolated"'):
        network.parse_mode("veth")
    with pytest.raises(network.BadSetting, match="expected one of isolated, host, none"):
        network.parse_mode("bridge")


def test_settings_rows(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('network_host_ports = ["3142", "53/udp"]\nnetwork_dns = ["192.0.2.1"]\n'
                    'network_ipv4_pool = "172.30.0.0/20"\n')
    cfg = settings.load(path, environ={})
    assert cfg.network == "isolated"
    assert cfg.network_options("host") == network.Options(
        mode="host", ipv4_pool="172.30.0.0/20", host_ports=("3142/tcp", "53/udp"),
        dns=("192.0.2.1",))
    for bad, message in (('network_host_ports = ["http"]', "expected PORT, PORT/tcp"),
                         ('network_dns = ["127.0.0.53"]', "cannot reach a loopback"),
                         ('network_dns = ["dns.example"]', "expected an IP address"),
                         ('network_ipv4_pool = "10.0.0.0/29"', "/26 or larger"),
                         ('network_ipv4_pool = "8.8.0.0/16"', "private IPv4 network"),
                         ('network = "veth"', '"veth" is gone')):
        path.write_text(bad + "\n")
        with pytest.raises(SettingsError, match=message):
            settings.load(path, environ={})


def test_zone_names_fit_interface_names() -> None:
    zones = {network.zone_of(f"nr-{job}-0123abcd") for job in range(2000)}
    assert len(zones) == 2000
    for zone in zones:
        assert len(zone) == 12 and zone.startswith("nr")
        assert len(network.bridge_of(zone)) == 15  # IFNAMSIZ - 1
    assert network.zone_of("nr-1-0123abcd") == network.zone_of("nr-1-0123abcd")


def test_address_plan() -> None:
    sub = network.subnet("10.223.0.0/16", 5, ipv6=True, machine_id="abc")
    assert str(sub.v4) == "10.223.0.80/28"
    assert (str(sub.gateway4), str(sub.guest4)) == ("10.223.0.81", "10.223.0.82")
    ula = network.ula_prefix("abc")
    assert ula.prefixlen == 48 and str(ula).startswith("fd")
    assert ula != network.ula_prefix("another host")
    assert sub.v6 is not None and sub.v6.subnet_of(ula) and sub.v6.prefixlen == 64
    assert int(sub.v6.network_address) >> 64 & 0xFFFF == 5
    assert network.subnet("10.223.0.0/16", 5, ipv6=False).v6 is None
    assert network.subnet_count("10.223.0.0/16") == 4096


def test_ipv6_default_route() -> None:
    unreachable = ("00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
                   "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n")
    real = ("00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
            "20010db8000000000000000000000001 00000400 00000001 00000000 00000003 uplink0\n")
    link = ("fe800000000000000000000000000000 40 00000000000000000000000000000000 00 "
            "00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n")
    assert not network.host_has_ipv6(unreachable + link)
    assert network.host_has_ipv6(unreachable + link + real)


def test_host_networks_and_pool_conflicts() -> None:
    routes = ("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
              "eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
              "eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
              "docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
              "vz-nr0123456789\t50DF0A00\t00000000\t0001\t0\t0\t0\tF0FFFFFF\t0\t0\t0\n")
    found = network.host_ipv4_networks(routes)
    assert [str(n) for n in found] == ["192.168.1.0/24", "172.17.0.0/16"]  # not ours
    assert network.pool_conflicts("172.16.0.0/12", [str(n) for n in found]) == ["172.17.0.0/16"]
    assert network.pool_conflicts("10.223.0.0/16", [str(n) for n in found]) == []


def test_resolvers(tmp_path: Path) -> None:
    etc, uplink = tmp_path / "resolv.conf", tmp_path / "uplink.conf"
    etc.write_text("# comment\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n"
                   "search example.com\noptions edns0\n")
    text, source = network.resolvers((), etc, uplink)
    assert text == "search example.com\noptions edns0\nnameserver 192.0.2.53\n"
    assert source == str(etc)
    # systemd-resolved's stub: its upstream servers instead.
    etc.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n")
    uplink.write_text("nameserver 198.51.100.1\nnameserver 2001:db8::1\n")
    text, source = network.resolvers((), etc, uplink)
    assert text == "nameserver 198.51.100.1\nnameserver 2001:db8::1\n"
    assert "systemd-resolved's upstream servers" in source
    # A local dnsmasq, no resolved: the setting is the way.
    uplink.unlink()
    etc.write_text("nameserver 127.0.0.1\n")
    with pytest.raises(SystemFailure, match=r"\(127.0.0.1, in .*\) are loopback addresses a "
                                            "job cannot reach.*set network_dns"):
        network.resolvers((), etc, uplink)
    assert network.resolvers(("192.0.2.1",), etc, uplink) == ("nameserver 192.0.2.1\n",
                                                             "network_dns")


def test_networkd_files() -> None:
    sub = network.subnet("10.223.0.0/16", 1, ipv6=True, machine_id="x")
    assert sub.v6 is not None
    gw6, guest6 = sub.v6.network_address + 1, sub.v6.network_address + 2
    host = network.host_network_text("nr0123456789", sub)
    assert "[Match]\nName=vz-nr0123456789\n" in host
    assert "IPMasquerade=both\n" in host and "ConfigureWithoutCarrier=yes\n" in host
    assert "Address=10.223.0.17/28\n" in host and f"Address={gw6}/64\n" in host
    assert "DHCPServer" not in host  # static: the machine knows its address at boot
    guest = network.guest_network_text(sub)
    assert "[Match]\nName=host0\n" in guest and "DHCP=no\n" in guest
    assert "Gateway=10.223.0.17\n" in guest and f"Gateway={gw6}\n" in guest
    assert "Address=10.223.0.18/28\n" in guest and f"Address={guest6}/64\n" in guest
    v4only = network.host_network_text("nr0123456789",
                                       network.subnet("10.223.0.0/16", 1, ipv6=False))
    assert "IPMasquerade=ipv4\n" in v4only and ":" not in v4only.split("[Address]")[1]


def test_ruleset() -> None:
    rules = network.ruleset(("3142/tcp", "8080/tcp", "53/udp"))
    # Replaced atomically: add, delete, define in one transaction.
    assert rules.startswith("table inet nspawn_runner\ndelete table inet nspawn_runner\n")
    assert 'iifname "vz-nr*" jump from_job' in rules
    assert "tcp dport { 3142, 8080 } accept" in rules and "udp dport { 53 } accept" in rules
    assert rules.index("dport") < rules.index("reject with tcp reset")
    assert 'oifname "vz-nr*" reject' in rules
    assert "dport" not in network.ruleset(())


def test_addresses_are_valid_networks() -> None:
    for index in (0, 1, 4095):
        sub = network.subnet("10.223.0.0/16", index, ipv6=True, machine_id="x")
        assert sub.v4.subnet_of(ipaddress.IPv4Network("10.223.0.0/16"))


def test_ready_unit_escapes_the_shell_for_systemd() -> None:
    unit = network.ready_unit_text(ipv6=True)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    # systemd turns $$ into $; a single $ would be expanded by systemd, not by the shell.
    assert '[ -x "$$w" ] && exec "$$w"' in exec_start and " $w" not in exec_start
    assert "--interface=host0 --operational-state=routable -4 -6 --timeout=10" in exec_start
    assert "Before=multi-user.target" in unit
    assert "ExecStartPost=/bin/touch /run/nspawn-runner/network-ready" in unit
    assert " -6" not in network.ready_unit_text(ipv6=False)
