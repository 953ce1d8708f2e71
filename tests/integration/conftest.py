"""Integration tests: the driver on real systemd, inside the test bed (tests/run integration).

Every test drives whole jobs through tests/gitlab_emulator.py, which calls the installed
`nspawn-runner` exactly as gitlab-runner does, and afterwards checks that nothing is left:
no machine, no unit, no overlay, no snapshot, no mount, no state file."""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from gitlab_emulator import Job, JobResult, RunnerConfig, run_job

from nspawn_runner.host import netplan

FAKE_GITLAB_RUNNER = Path(__file__).resolve().parents[1] / "fixtures" / "fake-gitlab-runner"
ROOTS = {
    # backend: (state root, backend setting). "auto" proves the file-system detection.
    "overlay": ("/var/lib/nspawn-runner", "auto"),
    "btrfs": ("/srv/btrfs/nspawn-runner", "auto"),
    "volatile": ("/var/lib/nspawn-runner", "volatile"),
}
IMAGE = "bookworm"
# Job ids unique across runs, so that a leftover of an earlier run can never pass for ours.
_ids = itertools.count(int(time.time() * 10) % 10**9 * 100)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.path.isdir("/run/systemd/system") or os.geteuid() != 0:
        pytest.exit("integration tests need real systemd as root: run them with "
                    "`tests/run integration` (they run inside the test bed)", returncode=3)


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


@dataclass
class Driver:
    backend: str
    root: Path
    settings: Path
    # Settings every write_settings keeps (a pooled driver's pool_size).
    base_settings: dict[str, object] = field(default_factory=dict)

    def config(self, default_image: str = "", verbose: bool = False,
               **overrides: object) -> RunnerConfig:
        exe = ["nspawn-runner", *(["--verbose"] if verbose else [])]
        prepare = [*exe, "prepare", *(["--default-image", default_image] if default_image else [])]
        cfg = RunnerConfig(
            config_exec=[*exe, "config"],
            prepare_exec=prepare,
            run_exec=["nspawn-runner", "run", *(["--verbose"] if verbose else [])],
            cleanup_exec=[*exe, "cleanup"],
            graceful_kill_timeout=30,
            force_kill_timeout=10,
            retry_delay=0.2,
            extra_process_env={"NSPAWN_RUNNER_CONFIG": str(self.settings)},
        )
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg

    def job(self, script: list[str], **kw: Any) -> Job:
        kw.setdefault("image", IMAGE)
        job = Job(script=script, job_id=next(_ids), **kw)
        return job

    def run(self, job: Job, config: RunnerConfig | None = None, **kw: Any) -> JobResult:
        result = run_job(config or self.config(), job, timeout=600, **kw)
        for call in result.calls:
            # The protocol knows 0, 1 and 2; anything else is an "unknown" failure.
            assert call.exit_code in (0, 1, 2), (call.stage, call.exit_code, result.log)
        return result

    def write_settings(self, **extra: object) -> None:
        values = {"root": str(self.root), "backend": ROOTS[self.backend][1],
                  "gitlab_runner": str(FAKE_GITLAB_RUNNER), **self.base_settings, **extra}
        self.settings.write_text(tomlkit.dumps(values))

    def make_image(self, name: str, init_script: str | None = None,
                   hanging_unit: bool = False) -> Path:
        """A copy of the test image whose init is `init_script`, or whose boot never finishes
        because a unit that multi-user.target waits for hangs (to make boots fail)."""
        src, dst = self.root / "images" / IMAGE, self.root / "images" / name
        if self.backend == "btrfs":
            sh("btrfs", "-q", "subvolume", "snapshot", str(src), str(dst))
        else:
            sh("cp", "-al", str(src), str(dst))  # hard links: cheap, and init is replaced below
        if init_script is not None:
            # nspawn --boot runs the first of /usr/lib/systemd/systemd, /lib/..., /sbin/init.
            init = dst / "usr" / "lib" / "systemd" / "systemd"
            init.unlink()  # a hard link to the test image's file on ext4: never write through it
            init.write_text("#!/bin/sh\n" + init_script + "\n")
            init.chmod(0o755)
        if hanging_unit:
            units = dst / "etc" / "systemd" / "system"
            (units / "hang.service").write_text(
                "[Unit]\nBefore=multi-user.target\n[Service]\nType=oneshot\n"
                "ExecStart=/bin/sleep 1000\n[Install]\nWantedBy=multi-user.target\n")
            wants = units / "multi-user.target.wants"
            wants.mkdir(exist_ok=True)
            (wants / "hang.service").symlink_to("../hang.service")
        return dst

    def remove_image(self, name: str) -> None:
        path = self.root / "images" / name
        if self.backend == "btrfs":
            sh("btrfs", "-q", "subvolume", "delete", str(path), check=False)
        shutil.rmtree(path, ignore_errors=True)


def network_leftovers() -> list[str]:
    """What a job's network (host/network.py) may leave on the host: its zone's bridge and
    veth, their addresses, networkd's file for the zone, its masquerading entries."""
    found = [f"link: {p.name}" for p in Path("/sys/class/net").iterdir()
             if p.name.startswith(("vz-nr", "vb-"))]
    found += [f"networkd file: {p}" for p in Path("/run/systemd/network").glob("*nspawn-runner*")]
    for family in ("ip", "ip6"):
        out = sh("nft", "list", "set", family, "io.systemd.nat", "masq_saddr", check=False)
        if "elements" in out:
            found.append(f"masquerading ({family}): {' '.join(out.split('elements =')[1].split())}")
    pools = (ipaddress.ip_network(netplan.DEFAULT_IPV4_POOL), netplan.ula_prefix())
    for link in json.loads(sh("ip", "-j", "address")):
        for addr in link.get("addr_info", []):
            if any(ipaddress.ip_address(addr["local"]) in pool for pool in pools):
                found.append(f"address: {addr['local']} on {link['ifname']}")
    return found


def settled_network_leftovers(timeout: float = 60) -> list[str]:
    """`network_leftovers` once stopping machines are gone: a machine's unit removes its
    network when it has stopped (executor/reap.py)."""
    deadline = time.monotonic() + timeout
    while (found := network_leftovers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def leftovers(root: Path) -> list[str]:
    found = network_leftovers()
    machines = [line for line in sh("machinectl", "list", "--no-legend").splitlines()
                if line.startswith(("nr-", "nrp-"))]
    found += [f"machine: {m}" for m in machines]
    units = sh("systemctl", "list-units", "--all", "--no-legend", "--plain",
               "nspawn-runner-*").splitlines()
    found += [f"unit: {u}" for u in units if u.strip()]
    overlays = root / "overlays"
    if overlays.exists():
        found += [f"overlay: {p}" for p in overlays.iterdir()]
    # nspawn's lock files (.#NAME.lck) are not counted: an unlocked one is harmless, and
    # removing one that another nspawn holds would break its locking.
    found += [f"snapshot: {p}" for p in (root / "images").glob(".#*") if p.suffix != ".lck"]
    run_dir = Path("/run/nspawn-runner")
    if run_dir.exists():
        found += [f"state: {p}" for p in run_dir.iterdir()]
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    found += [f"mount: {m}" for m in mounts if "/overlays/" in m or " /run/nspawn-runner" in m
              or "/propagate/nr-" in m or "/propagate/nrp-" in m]  # machinectl bind
    return found


def settled_leftovers(root: Path, timeout: float = 60) -> list[str]:
    """`leftovers` once the stopping machines are gone: cleanup returns as soon as systemd has
    the machine's stop job, and the unit removes what the machine left when it has stopped."""
    deadline = time.monotonic() + timeout
    while (found := leftovers(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


@pytest.fixture(params=["overlay", "btrfs"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def driver(backend: str, tmp_path: Path) -> Iterator[Driver]:
    root = Path(ROOTS[backend][0])
    assert (root / "images" / IMAGE).is_dir(), "the test bed provides the image"
    d = Driver(backend, root, tmp_path / "config.toml")
    d.write_settings()
    before = leftovers(root)
    assert not before, f"leftovers before the test: {before}"
    yield d
    left = settled_leftovers(root)
    assert not left, f"the driver left these behind: {left}"
