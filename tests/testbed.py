#!/usr/bin/env python3
"""The project's test bed: a booted systemd "runner host" container on a machine whose PID 1 is
not systemd, with a guest image on a btrfs and on a non-btrfs state root.

Stdlib only; runs as root with any Python 3.11. See ../shared/testbed.md for the facts it is
built on and docs/testing.md for how to use it.

The host boots in its own network namespace (--private-network): no test creates an interface,
an address or a firewall rule on this machine. Inside it, an "outside" network namespace joined
by a veth stands in for the internet: an HTTP server (a partial Debian mirror made here, and
whatever files tests put in /srv/outside) and a DNS server that knows `outside.test`.

    tests/testbed.py up       build (cached) root file systems, boot the host, install the driver
    tests/testbed.py exec -- CMD...   run CMD inside the booted host
    tests/testbed.py down     power off, unmount, remove everything but the cache
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import testbed_mirror

SUITE = "bookworm"
CHECKOUT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NSPAWN_RUNNER_TESTBED_CACHE", "/var/cache/nspawn-runner-testbed"))
STATE = Path(os.environ.get("NSPAWN_RUNNER_TESTBED_STATE", "/var/lib/nspawn-runner-testbed"))
MACHINE = "nrtestbed"
VENV = "/opt/nspawn-runner"
INNER_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The state roots the integration tests use inside the host: one per backend family.
ROOT_EXT4 = "/var/lib/nspawn-runner"
ROOT_BTRFS = "/srv/btrfs/nspawn-runner"
GUEST_IMAGE = "bookworm"

# The runner host: what a real runner host has, plus what the tests and image builds use.
HOST_PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "systemd-container", "libpam-systemd",
    "python3", "python3-venv", "python3-pip", "python3-gi", "python3-pydbus", "python3-yaml",
    "btrfs-progs", "debootstrap", "mmdebstrap", "arch-test", "git", "ca-certificates",
    "iproute2", "iputils-ping", "procps", "psmisc", "zstd", "util-linux", "tar",
    # Job networking: systemd-networkd is part of systemd; nft for the driver's rules; dnsmasq
    # (the binary only: Debian's dnsmasq package starts a server on every interface) for the
    # stand-in outside's DNS and tests that need a resolver stub on the host.
    "nftables", "dnsmasq-base", "curl",
    # nspawn-runner shell is tested as an ordinary user going through sudo.
    "sudo",
    # Image provisioning with playbooks: Debian's ansible has the community.general.chroot
    # connection (ansible-core alone has none).
    "ansible",
]
# A job image: what `systemd-run --machine` and a CI job need (pitfalls 7 and 10).
GUEST_PACKAGES = ["systemd", "systemd-sysv", "dbus", "git", "ca-certificates", "procps"]
# What image builds inside the bed install besides minbase (the images' required packages and
# what the image tests add), for the architectures they build.
# What image builds in the bed install, and what the Debian package test (test_package.py)
# installs from it: the .deb's dependencies the bed host lacks.
MIRROR_PACKAGES = [*GUEST_PACKAGES, "less", "python3-typer", "python3-tomlkit", "xz-utils"]
MIRROR_ARCHS = ["amd64", "i386"]

# The bed's network. The stand-in outside is 198.51.100.1 (TEST-NET-2) and 2001:db8::1
# (the documentation prefix) in its own namespace, so that the bed host reaches it by routing
# through its uplink, as a runner host reaches the internet; the uplink is .2 and ::2.
OUTSIDE_V4, OUTSIDE_V6 = "198.51.100.1", "2001:db8::1"
UPLINK_V4, UPLINK_V6 = "198.51.100.2", "2001:db8::2"
OUTSIDE_NAME = "outside.test"
OUTSIDE_NETNS = "outside"
UPLINK = "uplink0"


def log(msg: str) -> None:
    print(f"testbed: {msg}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str | os.PathLike[str]], check: bool = True,
        **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    argv = [os.fspath(c) for c in cmd]
    if os.environ.get("TESTBED_VERBOSE"):
        log("+ " + shlex.join(argv))
    return subprocess.run(argv, check=check, **kwargs)  # type: ignore[call-overload,no-any-return]


class Step:
    """Prints a named step with its duration."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.start = time.monotonic()
        log(f"{self.name} ...")

    def __exit__(self, *exc: object) -> None:
        status = "failed" if exc[0] else "done"
        log(f"{self.name}: {status} in {time.monotonic() - self.start:.1f}s")


def mirror() -> str:
    """The Debian mirror this machine's own apt sources name (the only one reachable)."""
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in src.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    return "http://deb.debian.org/debian"


def rootfs_tarball(kind: str, packages: list[str], hooks: list[str]) -> Path:
    key = hashlib.sha256(repr((SUITE, packages, hooks)).encode()).hexdigest()[:12]
    out = CACHE / f"{kind}-{SUITE}-{key}.tar.zst"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial.tar.zst")
    with Step(f"build {kind} root file system with mmdebstrap (cached as {out.name})"):
        run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(packages),
             *[f"--customize-hook={h}" for h in hooks], SUITE, tmp, mirror()])
        tmp.rename(out)
    return out


def host_tarball() -> Path:
    return rootfs_tarball("host", HOST_PACKAGES, [
        'truncate -s 0 "$1/etc/machine-id"',
        'echo nrtestbed > "$1/etc/hostname"',
        # The host's journal is of no interest and costs I/O on every boot.
        'mkdir -p "$1/etc/systemd/journald.conf.d"; '
        'printf "[Journal]\\nStorage=volatile\\n" > "$1/etc/systemd/journald.conf.d/testbed.conf"',
    ])


def guest_tarball() -> Path:
    return rootfs_tarball("guest", GUEST_PACKAGES, [
        'truncate -s 0 "$1/etc/machine-id"',
        'echo ci-guest > "$1/etc/hostname"',
        # As in images chroot-create makes: the guest configures its end of a veth or zone.
        'systemctl --root="$1" enable systemd-networkd.service',
    ])


def debian_mirror() -> Path:
    """The partial Debian mirror the bed's image builds use (see tests/testbed_mirror.py)."""
    key = hashlib.sha256(repr((SUITE, MIRROR_ARCHS, MIRROR_PACKAGES)).encode()).hexdigest()[:12]
    out = CACHE / f"mirror-{SUITE}-{key}"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with Step(f"make a partial Debian mirror for the bed (cached as {out.name})"):
            testbed_mirror.build(out, SUITE, mirror(), MIRROR_ARCHS, MIRROR_PACKAGES, log)
    return out


# The outside: a network namespace in the bed host joined to it by a veth. nodad: the
# IPv6 addresses are usable at once, not after duplicate address detection.
OUTSIDE_SCRIPT = f"""#!/bin/sh
set -e
ip netns add {OUTSIDE_NETNS}
ip link add {UPLINK} type veth peer name eth0 netns {OUTSIDE_NETNS}
ip -n {OUTSIDE_NETNS} link set lo up
ip -n {OUTSIDE_NETNS} address add {OUTSIDE_V4}/24 dev eth0
ip -n {OUTSIDE_NETNS} address add {OUTSIDE_V6}/64 dev eth0 nodad
ip -n {OUTSIDE_NETNS} link set eth0 up
ip address add {UPLINK_V4}/24 dev {UPLINK}
ip address add {UPLINK_V6}/64 dev {UPLINK} nodad
ip link set {UPLINK} up
ip route add default via {OUTSIDE_V4}
ip -6 route add default via {OUTSIDE_V6}
"""

UNITS = {
    "testbed-outside.service": """[Unit]
Description=Test bed: the outside network namespace and the uplink to it
Before=network.target systemd-networkd.service
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/testbed-outside

[Install]
WantedBy=multi-user.target
""",
    # Dual-stack on :: (python's http.server clears IPV6_V6ONLY).
    "testbed-outside-http.service": """[Unit]
Description=Test bed: the outside's HTTP server (the Debian mirror and test files)
Requires=testbed-outside.service
After=testbed-outside.service

[Service]
NetworkNamespacePath=/run/netns/outside
ExecStart=/usr/bin/python3 -m http.server 80 --bind :: --directory /srv/outside

[Install]
WantedBy=multi-user.target
""",
    # Answers outside.test, says NXDOMAIN for other .test names, refuses the rest (no upstream).
    "testbed-outside-dns.service": f"""[Unit]
Description=Test bed: the outside's DNS server
Requires=testbed-outside.service
After=testbed-outside.service

[Service]
NetworkNamespacePath=/run/netns/outside
ExecStart=/usr/sbin/dnsmasq --keep-in-foreground --conf-file=/dev/null --pid-file= \
    --log-facility=- --no-resolv --no-hosts --bind-interfaces \
    --listen-address={OUTSIDE_V4} --listen-address={OUTSIDE_V6} \
    --address=/{OUTSIDE_NAME}/{OUTSIDE_V4} --address=/{OUTSIDE_NAME}/{OUTSIDE_V6} --local=/test/

[Install]
WantedBy=multi-user.target
""",
}


def write_plain(path: Path, text: str, mode: int = 0o644) -> None:
    if path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def configure_network(root: Path) -> None:
    """The bed's network, written into its root before it boots: the outside, networkd
    running (with the .network files systemd ships), the outside's resolver and mirror."""
    write_plain(root / "usr/local/sbin/testbed-outside", OUTSIDE_SCRIPT, 0o755)
    for name, text in UNITS.items():
        write_plain(root / "etc/systemd/system" / name, text)
    run(["systemctl", f"--root={root}", "--quiet", "enable", *UNITS, "systemd-networkd.service"])
    write_plain(root / "etc/resolv.conf", f"nameserver {OUTSIDE_V4}\nnameserver {OUTSIDE_V6}\n")
    # The bed's own name without DNS, as Debian's installer writes it.
    hosts = root / "etc/hosts"
    write_plain(hosts, hosts.read_text() + f"127.0.1.1\t{MACHINE}\n")
    # Image builds in the bed default to the mirror of the host's apt sources: this one.
    for extra in (root / "etc/apt/sources.list.d").glob("*"):
        extra.unlink()
    write_plain(root / "etc/apt/sources.list",
                f"deb http://{OUTSIDE_V4}/debian {SUITE} main\n")
    (root / "srv/outside/debian").mkdir(parents=True, exist_ok=True)


def wheelhouse() -> Path:
    """The driver's wheel and every Python package the inner tests need, so the booted host
    installs offline (HTTPS from inside fails certificate checks on this workplace)."""
    wheels = STATE / "wheels"
    # Emptied, not removed: the booted host has this directory bind-mounted.
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.iterdir():
        old.unlink()
    with Step("build the driver wheel and its dependencies"):
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, CHECKOUT],
            stdout=subprocess.DEVNULL)
        cache = CACHE / "pip-download"
        cache.mkdir(parents=True, exist_ok=True)
        (wheel,) = wheels.glob("nspawn_runner-*.whl")
        run([sys.executable, "-m", "pip", "download", "-q", "-d", cache, wheel, "pytest",
             "--only-binary=:all:"], stdout=subprocess.DEVNULL)
        for f in cache.glob("*.whl"):
            if not f.name.startswith("nspawn_runner-"):
                shutil.copy2(f, wheels)
    return wheels


def nspawn_pid() -> int | None:
    try:
        pid = int((STATE / "nspawn.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"systemd-nspawn" in cmdline else None


def leader_pid(starting: bool = False) -> int:
    """PID of the host container's init, as seen from here. `starting`: systemd-nspawn was
    just spawned and may not have exec'd yet (its cmdline is still python's)."""
    pid = nspawn_pid()
    for _ in range(100 if starting else 0):
        if pid is not None:
            break
        time.sleep(0.05)
        pid = nspawn_pid()
    if pid is None:
        raise SystemExit("testbed: not running; start it with: tests/testbed.py up")
    for _ in range(200):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise SystemExit("testbed: systemd-nspawn started no init")


def inner(cmd: Sequence[str], check: bool = True, **kwargs: object) -> int:
    env = ["env", "-i", f"PATH={INNER_PATH}", "HOME=/root", "LANG=C.UTF-8",
           f"TERM={os.environ.get('TERM', 'dumb')}",
           *[f"{k}={v}" for k, v in os.environ.items() if k.startswith("NSPAWN_RUNNER_TEST")]]
    proc = run(["nsenter", "-t", str(leader_pid()), "-a", *env, *cmd], check=check, **kwargs)
    return proc.returncode


def down() -> None:
    pid = nspawn_pid()
    if pid is not None:
        with Step("power off the test bed host"):
            inner(["systemctl", "poweroff"], check=False, stderr=subprocess.DEVNULL)
            for _ in range(300):
                if nspawn_pid() is None:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
    btrfs = STATE / "btrfs"
    if os.path.ismount(btrfs):
        run(["umount", "--lazy", btrfs])
    (STATE / "btrfs.img").unlink(missing_ok=True)
    if (STATE / "host").exists():
        run(["rm", "-rf", "--one-file-system", STATE / "host"])
    (STATE / "nspawn.pid").unlink(missing_ok=True)


def install(fresh: bool = False) -> None:
    """(Re)install the driver from the checkout into the booted host."""
    if not fresh:
        wheelhouse()
    with Step("install the driver in the host"):
        if fresh:
            inner(["python3", "-m", "venv", "--system-site-packages", VENV])
        inner([f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", "/wheels",
               "--force-reinstall", "--no-deps", "nspawn-runner"])
        if fresh:
            inner([f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", "/wheels",
                   "nspawn-runner", "pytest"])
        inner(["ln", "-sf", f"{VENV}/bin/nspawn-runner", "/usr/local/bin/nspawn-runner"])


def up() -> None:
    down()  # a previous run may have been killed: never build on its leftovers
    STATE.mkdir(parents=True, exist_ok=True)
    host, guest, wheels = host_tarball(), guest_tarball(), wheelhouse()
    debian = debian_mirror()
    root = STATE / "host"
    with Step("unpack the host root file system"):
        root.mkdir()
        run(["tar", "--zstd", "-xpf", host, "-C", root, "--xattrs", "--xattrs-include=*",
             "--numeric-owner"])
        configure_network(root)
    with Step("make a btrfs state root on a loop file"):
        img, mnt = STATE / "btrfs.img", STATE / "btrfs"
        run(["truncate", "-s", "16G", img])
        run(["mkfs.btrfs", "-q", img], stdout=subprocess.DEVNULL)
        mnt.mkdir(exist_ok=True)
        run(["mount", "-o", "loop", img, mnt])
    with Step("boot the test bed host"):
        logf = open(STATE / "host.log", "wb")
        proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--boot",
             "--console=passive", f"--machine={MACHINE}", "-D", os.fspath(root),
             "--private-network", "--resolv-conf=off",
             f"--bind-ro={CHECKOUT}:/src", f"--bind={STATE / 'btrfs'}:/srv/btrfs",
             f"--bind-ro={wheels}:/wheels", f"--bind-ro={CACHE}:/testbed-cache",
             f"--bind-ro={guest}:/testbed-guest.tar.zst",
             f"--bind-ro={debian}:/srv/outside/debian"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True)
        (STATE / "nspawn.pid").write_text(str(proc.pid))
        leader_pid(starting=True)
        for _ in range(600):
            state = subprocess.run(
                ["nsenter", "-t", str(leader_pid()), "-a", "systemctl", "is-system-running"],
                capture_output=True, text=True).stdout.strip()
            if state in ("running", "degraded"):
                break
            if proc.poll() is not None:
                raise SystemExit(f"testbed: host container exited; see {STATE / 'host.log'}")
            time.sleep(0.1)
        else:
            raise SystemExit(f"testbed: host did not finish booting (state {state!r})")
        if os.stat(f"/proc/{leader_pid()}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            raise SystemExit("testbed: the host shares this machine's network namespace")
        if state == "degraded":
            inner(["systemctl", "--failed", "--no-pager"], check=False)
    with Step(f"wait for the outside ({OUTSIDE_NAME}: mirror and DNS, IPv4 and IPv6)"):
        url = f"http://{OUTSIDE_NAME}/debian/dists/{SUITE}/Release"
        for family in ("-4", "-6"):
            if inner(["sh", "-c", "for i in $(seq 100); do curl -fsS -o /dev/null "
                      f"{family} {url} && exit 0; sleep 0.1; done; exit 1"], check=False):
                raise SystemExit(f"testbed: {url} ({family}) unreachable in the bed; see "
                                 f"{sys.argv[0]} exec -- journalctl -u 'testbed-*'")
    install(fresh=True)
    with Step(f"place the guest image {GUEST_IMAGE!r} in both state roots"):
        for state_root, btrfs in ((ROOT_EXT4, False), (ROOT_BTRFS, True)):
            image = f"{state_root}/images/{GUEST_IMAGE}"
            inner(["mkdir", "-p", f"{state_root}/images"])
            if btrfs:
                inner(["btrfs", "-q", "subvolume", "create", image])
            else:
                inner(["mkdir", image])
            inner(["tar", "--zstd", "-xpf", "/testbed-guest.tar.zst", "-C", image,
                   "--xattrs", "--xattrs-include=*", "--numeric-owner"])
    log(f"up: enter it with: {sys.argv[0]} exec -- bash")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="build, boot and provision the test bed host")
    sub.add_parser("down", help="power off and remove the test bed host")
    sub.add_parser("status", help="say whether the test bed host runs")
    sub.add_parser("install", help="reinstall the driver from the checkout into the host")
    p_exec = sub.add_parser("exec", help="run a command inside the test bed host")
    p_exec.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("testbed: must run as root (it boots containers and mounts file systems)")
    if args.cmd == "up":
        up()
    elif args.cmd == "install":
        install()
    elif args.cmd == "down":
        down()
    elif args.cmd == "status":
        print("running" if nspawn_pid() else "stopped")
        return 0 if nspawn_pid() else 1
    else:
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        return inner(cmd or ["bash"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
