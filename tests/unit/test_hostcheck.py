"""`nspawn-runner check` with a fake host: which findings fail, warn or pass, and what is said."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nspawn_runner import check as host_check
from nspawn_runner import proc
from nspawn_runner.check import Check, Host, Report, Status
from nspawn_runner.cli import app
from nspawn_runner.errors import CommandError, SystemFailure
from nspawn_runner.host import machine
from nspawn_runner.host.backends import Backend
from nspawn_runner.settings import Settings


class FakeHost(Host):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root_user = True
        self.booted = True
        self.version = "systemd 252 (252.39-1~deb12u2)\n+PAM +AUDIT default-hierarchy=unified\n"
        self.commands = {*host_check.COMMANDS, "nft", "ip", "networkctl"}
        self.networkd = True
        self.ipv6 = True
        self.networks = ["192.168.1.0/24"]
        self.dns: tuple[str, str] | str = ("nameserver 192.0.2.53\n", "/etc/resolv.conf")
        self.probe_error = ""
        self.probes: list[tuple[str, tuple[str, int] | None]] = []
        self.machined_error = ""
        self.filesystems = {"/sys/fs/cgroup": "cgroup2fs", str(root): "ext2/ext3"}
        self.chosen = Backend.OVERLAY
        self.free = 100 * host_check.GIB
        self.runner: Path | None = Path("/usr/bin/gitlab-runner")
        self.boot_errors: dict[str, str] = {}
        self.boots: list[tuple[str, Path, int]] = []

    def is_root(self) -> bool:
        return self.root_user

    def systemd_booted(self) -> bool:
        return self.booted

    def pid1(self) -> str:
        return "bash"

    def nspawn_version(self) -> str:
        return self.version

    def which(self, command: str) -> str | None:
        return f"/usr/bin/{command}" if command in self.commands else None

    def machines(self) -> list[str]:
        if self.machined_error:
            raise SystemFailure(self.machined_error)
        return ["nr-1-abcdef01"]

    def filesystem(self, path: Path) -> str:
        if str(path) not in self.filesystems:
            raise CommandError(["stat", "-f", str(path)], 1, "No such file or directory")
        return self.filesystems[str(path)]

    def backend(self, cfg: Settings) -> Backend:
        return self.chosen

    def free_bytes(self, path: Path) -> int:
        return self.free

    def gitlab_runner(self, cfg: Settings) -> Path | None:
        if cfg.gitlab_runner == "/nonexistent":
            raise SystemFailure("gitlab_runner = '/nonexistent' is not a file")
        return self.runner

    def networkd_active(self) -> bool:
        return self.networkd

    def has_ipv6(self) -> bool:
        return self.ipv6

    def ipv4_networks(self) -> list[str]:
        return self.networks

    def resolvers(self, cfg: Settings) -> tuple[str, str]:
        if isinstance(self.dns, str):
            raise SystemFailure(self.dns)
        return self.dns

    def network_probe(self, cfg: Settings, image: str, path: Path, timeout: int,
                      target: tuple[str, int] | None) -> str:
        self.probes.append((image, target))
        if self.probe_error:
            raise SystemFailure(self.probe_error)
        return "192.0.2.80" if target else ""

    def boot(self, cfg: Settings, image: str, path: Path, timeout: int) -> float:
        self.boots.append((image, path, timeout))
        if image in self.boot_errors:
            raise SystemFailure(self.boot_errors[image])
        return 0.4


def make_image(root: Path, name: str, init: bool = True) -> Path:
    path = root / "images" / name
    (path / "usr/lib/systemd").mkdir(parents=True)
    if init:
        (path / "usr/lib/systemd/systemd").write_text("")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    make_image(root, "bookworm")
    make_image(root, "trixie")
    return root


@pytest.fixture
def host(root: Path) -> FakeHost:
    return FakeHost(root)


def check(host: FakeHost, root: Path, settings: str = "", boot: bool = True,
          boot_timeout: int = 0) -> Report:
    config = root.parent / "config.toml"
    config.write_text(f'root = "{root}"\n' + settings)
    return host_check.run(host, config, environ={}, boot=boot, boot_timeout=boot_timeout)


def by_name(report: Report) -> dict[str, Check]:
    return {c.name: c for c in report.checks}


def test_healthy_host(host: FakeHost, root: Path) -> None:
    report = check(host, root, 'network_check_url = "https://gitlab.example.com"\n')
    assert not report.failed and not report.warnings
    rows = by_name(report)
    assert list(rows) == ["settings", "systemd (PID 1)", "systemd version", "commands",
                          "machined (D-Bus)", "cgroups", "state root", "free space", "images",
                          "image bookworm", "image trixie", "network", "networkd",
                          "name resolution", "forwarding", "masquerading", "gitlab-runner"]
    assert all(c.status is Status.OK for c in report.checks)
    assert rows["systemd version"].detail == "systemd 252 (252.39-1~deb12u2)"
    assert rows["state root"].detail == f"{root} on ext2/ext3: overlay backend (auto)"
    assert rows["images"].detail == f"2 in {root}/images: bookworm, trixie"
    assert rows["image bookworm"].detail == "boots and runs /bin/bash (0.4s)"
    # Each image is booted with the boot_timeout setting.
    assert host.boots == [("bookworm", root / "images/bookworm", 120),
                          ("trixie", root / "images/trixie", 120)]
    assert rows["network"].detail.startswith('network = "isolated": a zone per job, /28s of '
                                             "10.223.0.0/16, IPv6 from fd")
    assert rows["name resolution"].detail == "jobs use 192.0.2.53 (from /etc/resolv.conf)"
    # The first image that booted, as an isolated job reaching the URL's host and port.
    assert host.probes == [("bookworm", ("gitlab.example.com", 443))]
    assert rows["masquerading"].detail == ("a job's machine reached gitlab.example.com "
                                           "(192.0.2.80) on port 443")
    report.raise_for_failures()
    assert report.summary() == "all checks passed"


def test_network_findings(host: FakeHost, root: Path) -> None:
    rows = by_name(check(host, root))
    assert rows["masquerading"].status is Status.SKIP  # no network_check_url
    assert "network_check_url" in rows["masquerading"].fix
    host.networkd = False
    host.networks = ["10.223.4.0/24"]
    host.dns = "the host's resolvers (127.0.0.53, in /etc/resolv.conf) are loopback"
    host.probes.clear()
    rows = by_name(check(host, root))
    assert rows["networkd"].status is Status.FAIL
    assert rows["networkd"].fix.startswith("systemctl enable --now systemd-networkd")
    assert rows["network pool"].status is Status.FAIL
    assert "overlaps the host's network 10.223.4.0/24" in rows["network pool"].detail
    assert rows["name resolution"].status is Status.FAIL
    assert "network_dns" in rows["name resolution"].fix
    assert "masquerading" not in rows and not host.probes  # nothing to learn from a boot


def test_network_probe_failure_and_other_modes(host: FakeHost, root: Path) -> None:
    host.probe_error = "a job's machine could not resolve 'gitlab.example.com'"
    rows = by_name(check(host, root, 'network_check_url = "gitlab.example.com:8443"\n'))
    assert host.probes == [("bookworm", ("gitlab.example.com", 8443))]
    assert rows["masquerading"].status is Status.FAIL
    assert rows["masquerading"].detail == host.probe_error
    rows = by_name(check(host, root, 'network = "host"\n'))
    assert rows["network"].status is Status.WARN and "127.0.0.1" in rows["network"].detail
    assert "networkd" not in rows
    rows = by_name(check(host, root, 'network = "none"\n'))
    assert rows["network"].status is Status.OK and "networkd" not in rows
    host.probes.clear()
    rows = by_name(check(host, root, boot=False))
    assert rows["masquerading"].status is Status.SKIP and not host.probes


def test_table_and_json(host: FakeHost, root: Path) -> None:
    (root / "images/trixie/usr/lib/systemd/systemd").unlink()
    report = check(host, root)
    text = report.render()
    lines = text.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    fail = next(i for i, line in enumerate(lines) if line.startswith("image trixie"))
    assert lines[fail].split()[2] == "FAIL"
    assert lines[fail + 1].strip().startswith("fix: install systemd, systemd-sysv and dbus")
    # The fix lines up under the detail column.
    assert lines[fail + 1].index("fix:") == lines[0].index("DETAIL")
    assert lines[-1] == ("1 check failed: jobs cannot run on this host until the FAIL lines "
                         "are fixed")
    data = json.loads(report.to_json())
    assert data["ok"] is False
    assert {"name": "image trixie", "status": "FAIL"}.items() <= data["checks"][10].items()
    assert set(data["checks"][0]) == {"name", "status", "detail", "fix"}
    with pytest.raises(SystemFailure, match="host check failed: image trixie"):
        report.raise_for_failures()


def test_not_systemd_fails_and_skips_boots(host: FakeHost, root: Path) -> None:
    host.booted = False
    rows = by_name(check(host, root))
    assert rows["systemd (PID 1)"].status is Status.FAIL
    assert "PID 1 is 'bash'" in rows["systemd (PID 1)"].detail
    assert rows["image bookworm"].status is Status.SKIP
    assert "systemd is not PID 1" in rows["image bookworm"].detail
    assert host.boots == []


@pytest.mark.parametrize(("version", "status"), [
    ("systemd 246 (246.1)\n", Status.FAIL), ("systemd 247\n", Status.OK),
    ("systemd 257 (257.9-1)\n", Status.OK), ("something else\n", Status.WARN)])
def test_systemd_version(host: FakeHost, root: Path, version: str, status: Status) -> None:
    host.version = version
    assert by_name(check(host, root))["systemd version"].status is status


def test_missing_commands(host: FakeHost, root: Path) -> None:
    host.commands -= {"systemd-nspawn", "machinectl"}
    rows = by_name(check(host, root))
    assert rows["commands"].status is Status.FAIL
    assert rows["commands"].detail == "not found on PATH: systemd-nspawn, machinectl"
    assert rows["commands"].fix == "apt-get install systemd-container"
    assert rows["systemd version"].status is Status.SKIP
    assert rows["image bookworm"].status is Status.SKIP and host.boots == []


def test_nspawn_version_fails(host: FakeHost, root: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> str:
        raise CommandError(["systemd-nspawn", "--version"], 1, "boom")

    monkeypatch.setattr(host, "nspawn_version", broken)
    row = by_name(check(host, root))["systemd version"]
    assert row.status is Status.FAIL and "boom" in row.detail


def test_machined_unreachable(host: FakeHost, root: Path) -> None:
    host.machined_error = "cannot reach systemd-machined (`machinectl list` failed: refused)"
    report = check(host, root)
    rows = by_name(report)
    assert rows["machined (D-Bus)"].status is Status.FAIL
    assert "refused" in rows["machined (D-Bus)"].detail
    assert "systemd-container" in rows["machined (D-Bus)"].fix
    assert rows["image bookworm"].status is Status.SKIP


@pytest.mark.parametrize(("top", "unified", "status", "text"), [
    ("cgroup2fs", None, Status.OK, "unified"),
    ("tmpfs", "cgroup2fs", Status.WARN, "hybrid"),
    ("tmpfs", None, Status.WARN, "legacy"),
    ("sysfs", None, Status.WARN, "cannot tell"),
])
def test_cgroup_layout(host: FakeHost, root: Path, top: str, unified: str | None,
                       status: Status, text: str) -> None:
    host.filesystems["/sys/fs/cgroup"] = top
    if unified:
        host.filesystems["/sys/fs/cgroup/unified"] = unified
    report = check(host, root)
    row = by_name(report)["cgroups"]
    assert row.status is status and text in row.detail
    assert not report.failed  # a warning does not fail the check


def test_missing_state_root(host: FakeHost, tmp_path: Path) -> None:
    report = check(host, tmp_path / "nothing")
    rows = by_name(report)
    assert rows["state root"].status is Status.FAIL
    assert f"mkdir -p {tmp_path}/nothing/images" in rows["state root"].fix
    assert "images" not in rows and "free space" not in rows


def test_no_images(host: FakeHost, tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    host.filesystems[str(root)] = "ext2/ext3"
    rows = by_name(check(host, root))
    assert rows["images"].status is Status.FAIL
    assert rows["images"].detail == f"no images in {root}/images"
    assert "nspawn-runner chroot-create NAME" in rows["images"].fix
    assert "docs/quickstart.md" in rows["images"].fix


def test_btrfs_backend_forced_on_another_file_system(host: FakeHost, root: Path) -> None:
    host.chosen = Backend.BTRFS
    row = by_name(check(host, root, 'backend = "btrfs"\n'))["state root"]
    assert row.status is Status.WARN
    assert "backend = 'btrfs'" in row.detail and "copies the whole image" in row.detail


def test_private_users_needs_btrfs(host: FakeHost, root: Path) -> None:
    row = by_name(check(host, root, "private_users = true\n"))["state root"]
    assert row.status is Status.FAIL and "private_users needs the btrfs backend" in row.detail
    host.chosen = Backend.BTRFS
    host.filesystems[str(root)] = "btrfs"
    assert by_name(check(host, root, "private_users = true\n"))["state root"].status is Status.OK


@pytest.mark.parametrize(("gib", "status"), [(0.5, Status.FAIL), (3, Status.WARN),
                                             (6, Status.OK)])
def test_free_space(host: FakeHost, root: Path, gib: float, status: Status) -> None:
    host.free = int(gib * host_check.GIB)
    assert by_name(check(host, root))["free space"].status is status


def test_boot_failure_and_timeout_option(host: FakeHost, root: Path) -> None:
    host.boot_errors["trixie"] = "machine nr-check-1-2 failed to boot from image 'trixie': x"
    rows = by_name(check(host, root, boot_timeout=15))
    assert rows["image bookworm"].status is Status.OK
    assert rows["image trixie"].status is Status.FAIL
    assert rows["image trixie"].detail.startswith("machine nr-check-1-2 failed to boot")
    assert f"systemd-nspawn -D {root}/images/trixie --boot" in rows["image trixie"].fix
    assert [b[2] for b in host.boots] == [15, 15]


def test_no_boot(host: FakeHost, root: Path) -> None:
    report = check(host, root, boot=False)
    assert host.boots == []
    row = by_name(report)["image bookworm"]
    assert row.status is Status.OK and "not booted (--no-boot)" in row.detail


def test_image_checks_follow_the_settings(host: FakeHost, root: Path) -> None:
    make_image(root, "broken", init=False)
    report = check(host, root, 'allowed_images = ["book*", "broken"]\ndefault_image = "sid"\n')
    rows = by_name(report)
    assert rows["image trixie"].status is Status.SKIP
    assert "allowed_images" in rows["image trixie"].detail
    assert rows["image broken"].status is Status.FAIL
    assert "has no init" in rows["image broken"].detail
    assert rows["default image"].status is Status.FAIL
    assert "'sid'" in rows["default image"].detail
    assert [b[0] for b in host.boots] == ["bookworm"]


def test_bad_image_file_fails(host: FakeHost, root: Path) -> None:
    files = root.parent / "image-files"
    files.mkdir()
    (files / "trixie.toml").write_text("suite = \n")
    rows = by_name(check(host, root, f'images_config_dir = "{files}"\n'))
    assert rows["image bookworm"].status is Status.OK
    assert rows["image trixie"].status is Status.FAIL
    assert "trixie.toml is not valid TOML" in rows["image trixie"].detail
    assert rows["image trixie"].fix == f"fix {files}/trixie.toml (docs/images.md)"
    assert [b[0] for b in host.boots] == ["bookworm"]


def test_not_root_warns_and_skips_boots(host: FakeHost, root: Path) -> None:
    host.root_user = False
    report = check(host, root)
    rows = by_name(report)
    assert rows["root"].status is Status.WARN
    assert "run `nspawn-runner check` as root" in rows["root"].fix
    assert rows["image bookworm"].status is Status.SKIP and host.boots == []
    assert not report.failed


def test_gitlab_runner(host: FakeHost, root: Path) -> None:
    host.runner = None
    row = by_name(check(host, root))["gitlab-runner"]
    assert row.status is Status.WARN and "caches and artifacts" in row.detail
    row = by_name(check(host, root, 'gitlab_runner = "/nonexistent"\n'))["gitlab-runner"]
    assert row.status is Status.FAIL


def test_bad_settings_fail_but_host_checks_still_run(host: FakeHost, root: Path) -> None:
    rows = by_name(check(host, root, "boot_timeout = -1\n"))
    assert rows["settings"].status is Status.FAIL
    assert "boot_timeout" in rows["settings"].detail
    assert rows["systemd (PID 1)"].status is Status.OK
    assert "images" not in rows


def test_real_boot_uses_a_volatile_machine_and_always_tears_it_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    booted: list[machine.BootSpec] = []
    torn: list[tuple[str, str, Path | None]] = []
    commands: list[list[str]] = []
    monkeypatch.setattr(machine, "boot", booted.append)
    monkeypatch.setattr(machine, "teardown", lambda m, u, o, t: torn.append((m, u, o)))

    def run(cmd: list[str], **kw: object) -> object:
        commands.append(cmd)
        raise CommandError(cmd, 1, "Failed to connect to bus: Protocol error")

    monkeypatch.setattr(proc, "run", run)
    cfg = Settings(root=tmp_path)
    with pytest.raises(SystemFailure, match=r"booted, but running /bin/bash in it failed "
                                            r"\(Failed to connect to bus: Protocol error\)"):
        Host().boot(cfg, "bookworm", tmp_path / "images/bookworm", 30)
    (spec,) = booted
    assert spec.backend is Backend.VOLATILE and spec.boot_timeout == 30
    assert spec.properties == ("--property=RuntimeMaxSec=330",)
    assert spec.machine.startswith("nr-check-")
    assert spec.unit == f"nspawn-runner-{spec.machine}.service"
    assert commands == [["systemd-run", "--quiet", f"--machine={spec.machine}", "--pipe",
                         "--wait", "--collect", "--service-type=exec", "--", "/bin/bash", "-c",
                         "true"]]
    assert torn == [(spec.machine, spec.unit, None)]


# The command line.

@pytest.fixture
def cli_host(host: FakeHost, root: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    config = root.parent / "config.toml"
    config.write_text(f'root = "{root}"\n')
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(config))
    monkeypatch.delenv("NSPAWN_RUNNER_ROOT", raising=False)
    monkeypatch.setattr(host_check, "Host", lambda: host)
    return host


def test_cli_check_ok(cli_host: FakeHost) -> None:
    result = CliRunner().invoke(app, ["check", "--boot-timeout", "9"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert result.stdout.endswith("all checks passed\n")
    assert [b[2] for b in cli_host.boots] == [9, 9]


def test_cli_check_failure_exits_with_system_failure(cli_host: FakeHost) -> None:
    cli_host.booted = False
    result = CliRunner().invoke(app, ["check", "--no-boot", "--json"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert "error: host check failed: systemd (PID 1)" in result.stderr
    assert cli_host.boots == []


def test_cli_check_warnings_do_not_fail(cli_host: FakeHost) -> None:
    cli_host.runner = None
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 0
    assert "all checks passed, 1 warning" in result.stdout
