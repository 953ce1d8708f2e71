#!/usr/bin/env python3
"""The project's test bed: a booted systemd "runner host" container on a machine whose PID 1 is
not systemd, with a guest image on a btrfs and on a non-btrfs state root.

Stdlib only; runs as root with any Python 3.11. See ../shared/testbed.md for the facts it is
built on and docs/testing.md for how to use it.

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
    # nspawn-runner shell is tested as an ordinary user going through sudo.
    "sudo",
    # Image provisioning with playbooks: Debian's ansible has the community.general.chroot
    # connection (ansible-core alone has none).
    "ansible",
]
# A job image: what `systemd-run --machine` and a CI job need (pitfalls 7 and 10).
GUEST_PACKAGES = ["systemd", "systemd-sysv", "dbus", "git", "ca-certificates", "procps"]


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
    ])


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
    root = STATE / "host"
    with Step("unpack the host root file system"):
        root.mkdir()
        run(["tar", "--zstd", "-xpf", host, "-C", root, "--xattrs", "--xattrs-include=*",
             "--numeric-owner"])
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
             f"--bind-ro={CHECKOUT}:/src", f"--bind={STATE / 'btrfs'}:/srv/btrfs",
             f"--bind-ro={wheels}:/wheels", f"--bind-ro={CACHE}:/testbed-cache"],
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
    install(fresh=True)
    with Step(f"place the guest image {GUEST_IMAGE!r} in both state roots"):
        for state_root, btrfs in ((ROOT_EXT4, False), (ROOT_BTRFS, True)):
            image = f"{state_root}/images/{GUEST_IMAGE}"
            inner(["mkdir", "-p", f"{state_root}/images"])
            if btrfs:
                inner(["btrfs", "-q", "subvolume", "create", image])
            else:
                inner(["mkdir", image])
            inner(["tar", "--zstd", "-xpf", f"/testbed-cache/{guest.name}", "-C", image,
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
