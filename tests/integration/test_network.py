"""Job networks on real systemd (host/network.py): isolated jobs reach the test bed's stand-in
for the internet (tests/testbed.py: `outside.test`, 198.51.100.1 and 2001:db8::1, an HTTP
server and DNS in a network namespace behind the bed host's uplink) by address and by name,
but neither the host's own services nor each other; `host` and `none` still work; `check`
says what a host lacks; cancel, crash and gc leave no bridge, address or rule behind (the
`driver` fixture checks that after every test, with conftest.network_leftovers)."""

from __future__ import annotations

import os
import secrets
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import IMAGE, ROOTS, Driver, network_leftovers, settled_network_leftovers, sh
from gitlab_emulator import JobResult
from test_check import check, rows, write_settings
from test_operations import gc, machines_of, wait_for

OUTSIDE = Path("/srv/outside")
UPLINK = "198.51.100.2"  # the bed host's own address on its uplink
GUEST_FILE = "/etc/systemd/network/10-nspawn-runner.network"
# Shell helpers for job scripts: bash's /dev/tcp, as minimal images have no curl.
FETCH = ('fetch() { exec 3<>"/dev/tcp/$1/$2" || return 1; printf "GET /%s HTTP/1.0\\r\\n'
         'Host: %s\\r\\n\\r\\n" "$3" "$1" >&3; cat <&3; exec 3<&-; }')
# OPEN, REFUSED (a TCP reset: nothing listens, or the host's firewall said no) or CLOSED
# (unreachable, or no answer within 5 s).
PROBE = ("probe() { if timeout 5 bash -c 'exec 3<>\"/dev/tcp/$0/$1\"' \"$1\" \"$2\" "
         "2>/tmp/err; then echo \"OPEN $1 $2\"; elif grep -q 'Connection refused' /tmp/err; "
         "then echo \"REFUSED $1 $2\"; else echo \"CLOSED $1 $2\"; fi; }")
OWN_V4 = f"sed -n 's|^Address=\\(10\\.[0-9.]*\\)/28$|\\1|p' {GUEST_FILE}"
OWN_V6 = f"sed -n 's|^Address=\\(fd[0-9a-f:]*\\)/64$|\\1|p' {GUEST_FILE}"
GATEWAY = f"sed -n 's|^Gateway=\\(10\\.[0-9.]*\\)$|\\1|p' {GUEST_FILE}"


@pytest.fixture
def page() -> Iterator[tuple[str, str]]:
    """A file on the outside's HTTP server: (its name, its content)."""
    token = secrets.token_hex(8)
    path = OUTSIDE / f"net-{token}.txt"
    path.write_text(f"content-{token}\n")
    yield path.name, f"content-{token}"
    path.unlink()


def run_ok(driver: Driver, script: list[str]) -> str:
    result = driver.run(driver.job(script))
    assert result.status == "success", result.log
    return result.plain_log


def test_job_reaches_the_outside_by_address_and_name(driver: Driver,
                                                     page: tuple[str, str]) -> None:
    name, content = page
    # The very first command uses the network: prepare returned only once it was usable.
    log = run_ok(driver, [f"{FETCH}; fetch 198.51.100.1 80 {name}",
                          f"{FETCH}; fetch outside.test 80 {name}",
                          f"{FETCH}; fetch 2001:db8::1 80 {name}",
                          "getent ahostsv4 outside.test; getent ahostsv6 outside.test",
                          "cat /etc/resolv.conf", "ls /sys/class/net"])
    assert log.count(content) == 3, log
    assert "198.51.100.1" in log and "2001:db8::1" in log
    assert "nameserver 198.51.100.1" in log  # the bed host's resolver
    assert log.split("$ ls /sys/class/net")[1].split()[:3] == ["host0", "lo", "Cleaning"]


@contextmanager
def host_servers(port: int) -> Iterator[None]:
    """TCP servers on the bed host that answer "host-service": on 127.0.0.1 and on every
    address (IPv4 and IPv6) of `port` + 1."""

    class Hello(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"host-service\n")

    class V6(socketserver.ThreadingTCPServer):
        address_family = socket.AF_INET6

    # The IPv6 one takes IPv4 too (bindv6only is off).
    servers = [socketserver.ThreadingTCPServer(("127.0.0.1", port), Hello),
               V6(("::", port + 1, 0, 0), Hello)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port if port < 65000 else 40000


def test_host_services_are_refused_unless_allowed(driver: Driver) -> None:
    port = free_port()
    script = [PROBE + f"; probe 127.0.0.1 {port}; probe $({GATEWAY}) {port}; "
              f"probe {UPLINK} {port + 1}; probe $({GATEWAY}) {port + 1}; "
              f"probe 2001:db8::2 {port + 1}; probe 198.51.100.1 80"]
    with host_servers(port):
        # The host itself reaches its services (the servers work).
        assert b"host-service" in subprocess.run(
            ["bash", "-c", f"exec 3<>/dev/tcp/{UPLINK}/{port + 1}; cat <&3"],
            capture_output=True, timeout=10).stdout
        log = run_ok(driver, script)
        assert "OPEN 198.51.100.1 80" in log, log  # the outside: yes
        for target in (f"127.0.0.1 {port}", f"{UPLINK} {port + 1}",
                       f"2001:db8::2 {port + 1}"):
            assert f"REFUSED {target}\n" in log, (target, log)
        assert log.count("REFUSED 10.223.") == 2, log  # the gateway, both ports
        assert [line for line in log.splitlines() if line.startswith("OPEN ")] == [
            "OPEN 198.51.100.1 80"], log
        # An admin allows one port of the host (e.g. a package proxy): only that one.
        driver.write_settings(network_host_ports=[f"{port + 1}/tcp"])
        log = run_ok(driver, script)
        assert f"OPEN {UPLINK} {port + 1}" in log and f"OPEN 2001:db8::2 {port + 1}" in log
        assert log.count("OPEN 10.223.") == 1, log  # the gateway, on the allowed port
        assert f"REFUSED 127.0.0.1 {port}" in log


class Listener:
    """A job that listens on a port (systemd-socket-activate, part of systemd), reports its
    addresses and waits until released."""

    def __init__(self, driver: Driver, port: int) -> None:
        self.driver = driver
        self.job = driver.job([
            f'echo "ADDRS=$({OWN_V4}) $({OWN_V6})"',
            f"systemd-socket-activate -l {port} -a --inetd echo job-answers "
            "> /dev/null 2>&1 &",
            "sleep 0.5; " + PROBE + f"; probe $({OWN_V4}) {port}",
            "echo listening; until [ -e /run/go ]; do sleep 0.2; done"])
        self.addresses: list[str] = []
        self.ready = threading.Event()
        self.result: JobResult | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.ready.wait(120), "the listening job did not start"

    def _live(self, line: str) -> None:
        if line.startswith("ADDRS="):
            self.addresses = line.removeprefix("ADDRS=").split()
        if line.strip() == "listening":
            self.ready.set()

    def _run(self) -> None:
        self.result = self.driver.run(self.job, live_output=self._live)

    def release(self) -> JobResult:
        (name,) = machines_of(self.job.job_id)
        sh("systemd-run", "--quiet", f"--machine={name}", "--wait", "/bin/touch", "/run/go")
        self.thread.join(120)
        assert self.result is not None
        return self.result


def test_two_jobs_cannot_reach_each_other(driver: Driver) -> None:
    port = 7777
    listener = Listener(driver, port)
    try:
        v4, v6 = listener.addresses
        assert v4.startswith("10.223.") and v6.startswith("fd"), listener.addresses
        other = driver.run(driver.job([PROBE + f"; probe {v4} {port}; probe {v6} {port}; "
                                       "probe 198.51.100.1 80",
                                       f'echo "MINE=$({OWN_V4})"']))
    finally:
        first = listener.release()
    assert first.status == "success", first.log
    assert f"OPEN {v4} {port}" in first.log  # it listens, as seen from its own zone
    assert other.status == "success", other.log
    assert f"OPEN {v4}" not in other.log and f"OPEN {v6}" not in other.log
    assert f"{v4} {port}" in other.log and f"{v6} {port}" in other.log  # probed
    assert "OPEN 198.51.100.1 80" in other.log
    assert f"MINE={v4}" not in other.log  # each job its own subnet


def test_host_and_none_networks(driver: Driver, page: tuple[str, str]) -> None:
    name, content = page
    driver.write_settings(network="host")
    log = run_ok(driver, ["ls /sys/class/net", f"{FETCH}; fetch outside.test 80 {name}"])
    assert "uplink0" in log.split("$ ls /sys/class/net")[1].split("$")[0].split()
    assert content in log
    driver.write_settings(network="none")
    log = run_ok(driver, ["ls /sys/class/net", PROBE + "; probe 198.51.100.1 80"])
    assert log.split("$ ls /sys/class/net")[1].split("$")[0].split() == ["lo"]
    assert "CLOSED 198.51.100.1 80" in log  # no route


def test_image_without_networkd_is_named_at_prepare(driver: Driver) -> None:
    image = driver.make_image("t-nonetworkd")
    try:
        # As if it had none: not enabled, and masked (a disabled one gets started).
        for link in (image / "etc/systemd/system").rglob("systemd-networkd*"):
            link.unlink()
        (image / "etc/systemd/system/systemd-networkd.service").symlink_to("/dev/null")
        result = driver.run(driver.job(["true"], image="t-nonetworkd"))
        assert result.status == "system_failure"
        assert "image 't-nonetworkd' does not run systemd-networkd" in result.log
        assert "systemctl --root=IMAGE enable systemd-networkd" in result.log
    finally:
        driver.remove_image("t-nonetworkd")


@contextmanager
def resolver_stub() -> Iterator[None]:
    """The bed host's resolv.conf pointed at a local stub (dnsmasq on 127.0.0.53, which
    forwards to the outside's DNS), as with systemd-resolved or a local cache."""
    etc = Path("/etc/resolv.conf")
    saved = etc.read_text()
    stub = subprocess.Popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                             "--pid-file=", "--no-resolv", "--no-hosts", "--bind-interfaces",
                             "--listen-address=127.0.0.53", "--server=198.51.100.1"])
    try:
        etc.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
        yield
    finally:
        etc.write_text(saved)
        stub.terminate()
        stub.wait()


def resolves(name: str) -> bool:
    try:
        return bool(socket.getaddrinfo(name, 80))
    except socket.gaierror:
        return False


def test_resolvers_behind_a_loopback_stub(driver: Driver, tmp_path: Path) -> None:
    uplink = Path("/run/systemd/resolve/resolv.conf")
    assert not uplink.exists()
    script = ["cat /etc/resolv.conf", "getent hosts outside.test"]
    with resolver_stub():
        wait_for(lambda: resolves("outside.test"), timeout=10)  # the host, through its stub
        result = driver.run(driver.job(script))
        assert result.status == "system_failure"
        assert "(127.0.0.53, in /etc/resolv.conf) are loopback addresses" in result.log
        assert "set network_dns" in result.log
        try:
            # systemd-resolved's list of upstream servers, as it writes it.
            uplink.parent.mkdir(parents=True, exist_ok=True)
            uplink.write_text("nameserver 198.51.100.1\nsearch .\n")
            log = run_ok(driver, script)
            assert "nameserver 198.51.100.1" in log and "127.0.0.53" not in log
            assert "outside.test" in log.split("$ getent hosts outside.test")[1]
        finally:
            uplink.unlink()
        driver.write_settings(network_dns=["2001:db8::1"])
        log = run_ok(driver, script)
        assert "nameserver 2001:db8::1" in log
        assert "outside.test" in log.split("$ getent hosts outside.test")[1]


def test_check_proves_jobs_get_out_and_names_a_missing_networkd(tmp_path: Path) -> None:
    root = ROOTS["overlay"][0]
    settings = write_settings(tmp_path / "config.toml", root)
    with settings.open("a") as f:
        f.write('network_check_url = "http://outside.test/"\n')
    result = check(settings)
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    for name in ("network", "networkd", "name resolution", "forwarding", "masquerading"):
        assert table[name][0] == "ok", (name, result.stdout)
    assert "jobs use 198.51.100.1, 2001:db8::1 (from /etc/resolv.conf)" in table[
        "name resolution"][1]
    assert table["masquerading"][1].startswith("a job's machine reached outside.test (")
    assert not network_leftovers(), "check's test machine left its network behind"
    units = ["systemd-networkd.socket", "systemd-networkd.service"]
    sh("systemctl", "mask", "--runtime", "--now", *units)
    try:
        result = check(settings)
        assert result.returncode == 2, result.stdout + result.stderr
        status, detail, fix = rows(result.stdout)["networkd"]
        assert status == "FAIL" and "not running" in detail
        assert fix.startswith("systemctl enable --now systemd-networkd")
        # And a job fails at prepare, saying the same.
        d = Driver("overlay", Path(root), tmp_path / "job.toml")
        d.write_settings()
        job = d.run(d.job(["true"]))
        assert job.status == "system_failure"
        assert "systemctl enable --now systemd-networkd" in job.log
    finally:
        sh("systemctl", "unmask", "--runtime", *units)
        sh("systemctl", "start", *units)
    assert not network_leftovers()


def test_cancel_and_crash_leave_no_network(driver: Driver) -> None:
    job = driver.job(["echo step-started", "sleep 300"])
    seen: dict[str, list[str]] = {}

    def look(line: str) -> None:
        if "step-started" in line and "links" not in seen:
            seen["links"] = network_leftovers()

    result = driver.run(job, cancel_at=("build_script", 2.0), live_output=look)
    assert result.status == "canceled", result.log
    assert any(f.startswith("link: vz-nr") for f in seen["links"]), seen
    assert not settled_network_leftovers()
    # nspawn killed with the machine: its zone's bridge stays until cleanup removes it.
    job = driver.job(["echo step-started", "sleep 300"])
    thread_result: dict[str, JobResult] = {}
    started = threading.Event()
    thread = threading.Thread(target=lambda: thread_result.update(r=driver.run(
        job, live_output=lambda line: started.set() if "step-started" in line else None)))
    thread.start()
    assert started.wait(120), "the job did not start"
    (name,) = machines_of(job.job_id)
    assert any(f.startswith("link: vb-") for f in network_leftovers())
    sh("systemctl", "kill", "--signal=SIGKILL", f"nspawn-runner-{name}.service")
    thread.join(120)
    assert thread_result["r"].status == "system_failure", thread_result["r"].log
    assert not settled_network_leftovers()  # removed the zone nspawn could not
    if driver.backend == "btrfs":
        gc(driver)  # the ephemeral snapshot of a killed nspawn is gc's (test_operations)


def test_a_dead_runner_and_a_killed_nspawn_leave_no_network(driver: Driver, tmp_path: Path) -> None:
    job_id = driver.job([]).job_id
    (tmp_path / "r.json").write_text(f'{{"id": {job_id}}}')
    env = {**os.environ, "JOB_RESPONSE_FILE": str(tmp_path / "r.json"),
           "NSPAWN_RUNNER_CONFIG": str(driver.settings), "CUSTOM_ENV_CI_JOB_IMAGE": IMAGE}
    # A runner that is gone once prepare returns; then nspawn is killed too.
    subprocess.run([sys.executable, "-c", "import subprocess, sys; "
                    "sys.exit(subprocess.call(['nspawn-runner', 'prepare']))"], env=env,
                   check=True)
    (name,) = machines_of(job_id)
    sh("systemctl", "kill", "--signal=SIGKILL", f"nspawn-runner-{name}.service")
    wait_for(lambda: not machines_of(job_id))
    # Whatever killed it, the machine's unit removes its network once it has stopped
    # (executor/reap.py); gc, the backstop for a host that lost power, then finds none.
    assert not settled_network_leftovers()
    output = gc(driver)
    assert f"network of machine {name}" not in output, output
