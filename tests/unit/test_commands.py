"""Command lines the driver runs, compared as lists."""

from pathlib import Path

import pytest

from nspawn_runner.executor import run as run_stage
from nspawn_runner.executor import state
from nspawn_runner.host import backends, fs, machine
from nspawn_runner.host.backends import Backend


def spec(backend: Backend, **kw: object) -> machine.BootSpec:
    args: dict[str, object] = dict(
        machine="nr-1-abcdef01", unit="nspawn-runner-nr-1-abcdef01.service", image="bookworm",
        image_path=Path("/r/images/bookworm"), backend=backend, root=Path("/r"),
        boot_timeout=60, stop_timeout=20,
        binds=((Path("/r/cache/h/g/p"), "/cache/g/p"),),
        binds_ro=((Path("/usr/bin/gitlab-runner"), "/usr/local/bin/gitlab-runner"),),
        description="d",
    )
    args.update(kw)
    return machine.BootSpec(**args)  # type: ignore[arg-type]


def test_boot_command_overlay() -> None:
    assert machine.boot_command(spec(Backend.OVERLAY)) == [
        "systemd-run", "--quiet", "--unit=nspawn-runner-nr-1-abcdef01.service", "--collect",
        "--description=d", "--property=Type=notify", "--property=Slice=machine.slice",
        "--property=Delegate=yes", "--property=KillMode=mixed",
        "--property=TimeoutStartSec=60", "--property=TimeoutStopSec=20",
        "--property=DevicePolicy=closed", "--property=DeviceAllow=/dev/net/tun rwm",
        "--property=DeviceAllow=char-pts rw", "--",
        "systemd-nspawn", "--quiet", "--keep-unit", "--boot", "--notify-ready=yes",
        "--machine=nr-1-abcdef01", "--directory=/r/images/bookworm",
        "--overlay=/r/images/bookworm:/r/overlays/nr-1-abcdef01/upper:/",
        "--settings=no", "--link-journal=no", "--console=read-only",
        "--tmpfs=/run/nspawn-runner:mode=0755,size=1m",
        "--bind=/r/cache/h/g/p:/cache/g/p",
        "--bind-ro=/usr/bin/gitlab-runner:/usr/local/bin/gitlab-runner",
    ]


@pytest.mark.parametrize(("backend", "arg"), [(Backend.BTRFS, "--ephemeral"),
                                              (Backend.VOLATILE, "--volatile=overlay")])
def test_boot_command_other_backends(backend: Backend, arg: str) -> None:
    cmd = machine.boot_command(spec(backend))
    assert arg in cmd
    assert not [a for a in cmd if a.startswith("--overlay")]
    assert spec(backend).overlay is None


def test_paths_with_colons_are_escaped() -> None:
    cmd = machine.boot_command(spec(Backend.OVERLAY, root=Path("/a:b"),
                                    image_path=Path("/a:b/images/x\\y"),
                                    binds=((Path("/c:d"), "/cache/g/p"),)))
    assert "--overlay=/a\\:b/images/x\\\\y:/a\\:b/overlays/nr-1-abcdef01/upper:/" in cmd
    assert "--bind=/c\\:d:/cache/g/p" in cmd


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fs, "_mount_type", lambda p: "")  # not found: `stat -f` decides
    monkeypatch.setattr(fs, "filesystem", lambda p: "btrfs")
    assert backends.choose("auto", Path("/")) is Backend.BTRFS
    monkeypatch.setattr(fs, "filesystem", lambda p: "ext2/ext3")
    assert backends.choose("auto", Path("/")) is Backend.OVERLAY
    assert backends.choose("volatile", Path("/")) is Backend.VOLATILE


def test_mount_type_from_mountinfo() -> None:
    assert fs._mount_type(Path("/proc")) == "proc"
    assert fs._mount_type(Path("/proc/self")) == "proc"
    assert fs._mount_type(Path("/nonexistent")) == ""


def test_run_command() -> None:
    st = state.MachineState(machine="nr-1-abcdef01", unit="u", image="i", backend="btrfs",
                            root="/r", overlay=None)
    assert run_stage.command(st, "ci-build_script-7.service") == [
        "systemd-run", "--quiet", "--machine=nr-1-abcdef01", "--pipe", "--wait", "--collect",
        "--unit=ci-build_script-7.service", "--service-type=exec",
        "--property=TimeoutStopSec=5", "--working-directory=/root",
        "--setenv=HOME=/root", "--setenv=USER=root", "--setenv=LOGNAME=root",
        "--setenv=SHELL=/bin/bash", "--",
        "/bin/sh", "-c", ': > "$0.started"; /bin/bash; echo $? > "$0.status"',
        "/run/nspawn-runner/ci-build_script-7.service",
    ]


@pytest.mark.parametrize("stage", ["build_script", "step_release", "clear_worktree",
                                   "a stage/with odd;chars", "x" * 200])
def test_step_unit_names_are_valid(stage: str) -> None:
    unit = run_stage.step_unit(stage)
    assert unit.endswith(".service") and len(unit) < 100
    assert all(c.isalnum() or c in "-_." for c in unit)


def test_limits_personality_and_idmap_in_boot_command() -> None:
    cmd = machine.boot_command(spec(Backend.BTRFS, personality="x86", idmap=True,
                                    properties=("--property=MemoryMax=1G",),
                                    nspawn_options=("--private-network",)))
    assert cmd.index("--property=MemoryMax=1G") < cmd.index("--")  # on the unit, not nspawn
    assert "--personality=x86" in cmd
    assert "--bind=/r/cache/h/g/p:/cache/g/p:idmap" in cmd
    assert cmd[-1] == "--private-network"


def test_init_arguments_come_last() -> None:
    cmd = machine.boot_command(spec(Backend.BTRFS, nspawn_options=("--private-network",),
                                    init_args=("systemd.mask=getty.target",)))
    assert cmd[-2:] == ["--private-network", "systemd.mask=getty.target"]
