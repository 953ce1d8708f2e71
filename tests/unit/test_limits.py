import os
from pathlib import Path

import pytest

from nspawn_runner import settings
from nspawn_runner.executor import state
from nspawn_runner.host import limits
from nspawn_runner.host.limits import Bind, LimitError, Limits
from nspawn_runner.settings import Settings, SettingsError

ROOT = Path("/var/lib/nspawn-runner")


def test_unit_properties_and_nspawn_args() -> None:
    lim = Limits(cpu_weight=50, cpu_quota="200%", memory_high="6G", memory_max="8G",
                 tasks_max=4096, max_job_duration=3600, network="private",
                 binds=(Bind(Path("/srv/data"), "/data", True),),
                 nspawn_options=("--setenv=A=b",))
    assert lim.unit_properties() == [
        "--property=CPUWeight=50", "--property=CPUQuota=200%", "--property=MemoryHigh=6G",
        "--property=MemoryMax=8G", "--property=TasksMax=4096", "--property=RuntimeMaxSec=3600"]
    # The network's options come from host/network.py (tests/unit/test_network.py).
    assert lim.nspawn_args() == ["--bind-ro=/srv/data:/data", DROP, "--setenv=A=b"]
    assert Limits().unit_properties() == [] and Limits().nspawn_args() == [DROP]
    # The job's own timeout bounds the machine; max_job_duration only when there is none.
    assert lim.unit_properties(600)[-1] == "--property=RuntimeMaxSec=600"


DROP = "--drop-capability=CAP_AUDIT_CONTROL,CAP_LINUX_IMMUTABLE"


def test_devices_and_capabilities_given_back() -> None:
    lim = Limits(devices=("/dev/fuse",), nspawn_options=("--capability=cap_linux_immutable",))
    assert lim.unit_properties() == ["--property=DeviceAllow=/dev/fuse rwm"]
    assert lim.nspawn_args() == ["--bind=/dev/fuse", "--drop-capability=CAP_AUDIT_CONTROL",
                                 "--capability=cap_linux_immutable"]


@pytest.mark.parametrize("device", ["/dev/sda", "/dev/mem", "/dev/loop0", "/dev/fuse/../sda",
                                    "fuse"])
def test_devices_outside_the_allow_list_are_refused(device: str) -> None:
    with pytest.raises(LimitError, match="not allowed"):
        limits.parse_device(device)


def test_private_users_idmaps_binds() -> None:
    lim = Limits(private_users=True, binds=(Bind(Path("/a:b"), "/x", False),))
    assert lim.nspawn_args() == ["--private-users=pick", "--private-users-ownership=auto",
                                 "--bind=/a\\:b:/x:idmap", DROP]


@pytest.mark.parametrize("spec", ["/:/host", "//:/h", "/var/lib/nspawn-runner:/x",
                                  "/var/lib/nspawn-runner/cache:/c", "/var:/v", "/var/lib:/v",
                                  "/var/run/docker.sock:/d", "/run:/r", "/run/docker.sock:/d",
                                  "relative:/x", "/a:relative", "/a:/b:maybe", "/a", "/a/../b:/c",
                                  "/srv:/"])
def test_dangerous_or_malformed_binds_are_refused(spec: str) -> None:
    with pytest.raises(LimitError, match="bind"):
        limits.parse_bind(spec, ROOT)


def test_good_binds() -> None:
    assert limits.parse_bind("/srv/data:/data:ro", ROOT) == Bind(Path("/srv/data"), "/data", True)
    assert limits.parse_bind("/srv/data/:/data/", ROOT) == Bind(Path("/srv/data"), "/data",
                                                                False)


@pytest.mark.parametrize("option", ["--bind=/:/x", "--private-users=no", "--capability=all",
                                    "--directory=/", "--machine=x", "--network-zone=a", "-D/"])
def test_unsafe_nspawn_options_are_refused(option: str) -> None:
    with pytest.raises(LimitError):
        limits.parse_nspawn_option(option)


def test_safe_nspawn_options() -> None:
    for option in ("--setenv=A=b", "--capability=CAP_NET_ADMIN", "--read-only",
                   "--tmpfs=/scratch"):
        assert limits.parse_nspawn_option(option) == option


@pytest.mark.parametrize(
    ("text", "message"),
    [("cpu_weight = 20000", "cpu_weight.*10000"), ('memory_max = "lots"', "memory_max"),
     ("tasks_max = 20000", "tasks_max.*16384"), ('network = "bridge"', "network.*host"),
     ('user = "Root!"', "user"), ("private_users = 1", "private_users.*true or false"),
     ('nspawn_options = ["--bind=/:/x"]', "nspawn_options.*not allowed"),
     ('binds = ["/:/host"]', "binds.*'/'"), ("max_job_duration = -1", "max_job_duration")],
)
def test_bad_limits_in_the_settings_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(SettingsError, match=message):
        settings.load(path, environ={})


def test_binds_are_checked_against_the_root_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('binds = ["/srv/x:/x"]\n')
    assert settings.load(path, environ={}).limits().binds[0].host == Path("/srv/x")
    with pytest.raises(SettingsError, match="state root"):
        settings.load(path, environ={"NSPAWN_RUNNER_ROOT": "/srv/x/nr"})


def test_image_overrides() -> None:
    lim = Settings(memory_max="8G", tasks_max=100).limits(memory_max="2G")
    assert (lim.memory_max, lim.tasks_max) == ("2G", 100)


def test_owner_identity_skips_wrappers() -> None:
    me = state.owner_identity(os.getpid())
    assert me.startswith(f"{os.getpid()}:") and state.owner_alive(me)
    pid, _, start = me.partition(":")
    assert not state.owner_alive(f"{pid}:{int(start) + 1}")  # a reused pid is not the owner
    assert not state.owner_alive("") and not state.owner_alive("999999999:1")


def test_boot_mask_and_suppress_sync() -> None:
    lim = Limits(suppress_sync=True, boot_mask=("getty.target", "apt-daily.timer"))
    assert "--suppress-sync=yes" in lim.nspawn_args()
    assert lim.init_args() == ["systemd.mask=getty.target", "systemd.mask=apt-daily.timer"]
    assert "--suppress-sync=yes" not in Limits().nspawn_args()
    assert "systemd.mask=console-getty.service" in Limits().init_args()
    assert Limits(boot_mask=()).init_args() == []


@pytest.mark.parametrize("unit", ["getty", "a b.service", "x.service; reboot", "x.service=y",
                                  "$(id).timer", "%h.service"])
def test_bad_unit_names_are_refused(unit: str) -> None:
    with pytest.raises(LimitError, match="is not a unit name"):
        limits.parse_unit(unit)
