"""The Debian package on real systemd. `debian/build` makes it before the bed boots (tests/run
does; the bed sees it in /src/build/deb); here it is installed with apt, as an admin does
(`apt install ./nspawn-runner_*.deb`), with the venv's nspawn-runner taken off PATH: it must
work with Debian's own typer, tomlkit and pydbus. Then used as a runner host uses it (its
timers, check, toml --merge, a job through the merged block), and purged: nothing may be left
but what docs/install.md says is kept."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomlkit
from conftest import IMAGE, ROOTS, Driver, leftovers
from gitlab_emulator import RunnerConfig

DEBS = Path("/src/build/deb")
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gitlab-config" / "registered.toml"
VENV_LINK = Path("/usr/local/bin/nspawn-runner")
# Where the snapshot looks for what the package leaves behind, and what changes there anyway.
WATCHED = ("/etc", "/usr", "/lib", "/var/lib", "/opt")
UNWATCHED = ("/var/lib/apt", "/var/lib/dpkg", "/var/lib/nspawn-runner", "/var/lib/machines",
             "/var/lib/systemd/catalog", "/var/lib/systemd/coredump", "/etc/ld.so.cache",
             "/opt/nspawn-runner", "/var/lib/ucf", "/usr/local/bin/nspawn-runner")
# What docs/install.md ("Uninstall") says a purge keeps: the state root with the images, and
# image files an admin wrote (none here).
KEPT_BY_PURGE = ("/var/lib/nspawn-runner",)
TIMERS = ("nspawn-runner-gc.timer", "nspawn-runner-maintenance.timer")
# A runner host's PATH: without the test bed's venv, which pytest runs from.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(*cmd: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PATH": PATH, "DEBIAN_FRONTEND": "noninteractive",
                                 **env})
    if check:
        assert result.returncode == 0, f"{cmd}: {result.stdout}{result.stderr}"
    return result


def snapshot() -> set[str]:
    found: set[str] = set()
    # /lib is a link to /usr/lib on a merged-/usr system: walked once, through /usr.
    for top in (t for t in WATCHED if not os.path.islink(t)):
        for directory, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not os.path.join(directory, d).startswith(UNWATCHED)]
            found |= {os.path.join(directory, n) for n in dirs + files}
    return {p for p in found if not p.startswith(UNWATCHED)}


def packages() -> set[str]:
    out = run("dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n").stdout
    return {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["ii"]}


def not_ours(paths: set[str], names: set[str]) -> set[str]:
    """What of `paths` other packages (`names`) explain: their files, the byte code Python
    compiled next to their modules, the links update-alternatives made for them."""
    owned: set[str] = set()
    for name in names:
        listed = set(run("dpkg", "-L", name).stdout.split("\n")) - {""}
        # dpkg lists /lib/...; on a merged-/usr system the file is seen as /usr/lib/...
        owned |= listed | {"/usr" + p for p in listed if p.startswith(("/lib/", "/bin/", "/sbin/"))}
    modules = {str(Path(p).parent) for p in owned if p.endswith(".py")}
    # deb-systemd-helper's state of those packages' units.
    units = {Path(p).name for p in owned if "/systemd/system/" in p}
    return {p for p in paths
            if p in owned
            or (p.startswith("/var/lib/systemd/deb-systemd-helper-")
                and Path(p).name.removesuffix(".dsh-also") in units)
            or (Path(p).name == "__pycache__" and str(Path(p).parent) in modules)
            or (Path(p).parent.name == "__pycache__" and str(Path(p).parent.parent) in modules)
            or p.startswith("/etc/alternatives/")
            or (os.path.islink(p) and os.readlink(p).startswith("/etc/alternatives/"))}


@pytest.fixture
def deb() -> Iterator[Path]:
    found = sorted(DEBS.glob("nspawn-runner_*_all.deb"))
    assert found, (f"no package in {DEBS}: build it with debian/build {DEBS.relative_to('/src')} "
                   "on the machine (tests/run integration does) before the test bed boots")
    assert "nspawn-runner" not in packages()
    aside = VENV_LINK.with_name("nspawn-runner.venv-aside")
    VENV_LINK.rename(aside)  # the venv's nspawn-runner off PATH: only the package's is found
    try:
        yield found[-1]
    finally:
        if "nspawn-runner" in packages():
            run("apt-get", "purge", "-y", "nspawn-runner", check=False)
        aside.rename(VENV_LINK)


def test_install_use_and_purge(deb: Path, tmp_path: Path) -> None:
    # An empty /etc/nspawn-runner an earlier test left is the package's own directory once it is
    # installed, and its purge rightly removes it: start without it, as a fresh host does.
    with contextlib.suppress(OSError):
        os.rmdir("/etc/nspawn-runner")
    before, installed_before = snapshot(), packages()
    # The bed's root file system comes without package lists; its mirror has no translations.
    run("apt-get", "-o", "Acquire::Languages=none", "update", "-qq")
    run("apt-get", "install", "-y", str(deb))
    pulled_in = packages() - installed_before - {"nspawn-runner"}

    # The package's program, on Debian's python3 with Debian's libraries.
    assert shutil.which("nspawn-runner", path=PATH) == "/usr/bin/nspawn-runner"
    assert run("nspawn-runner", "--version").stdout.startswith("nspawn-runner ")
    libraries = run("/usr/bin/python3", "-c", "import typer, tomlkit, nspawn_runner; "
                    "print(typer.__version__, tomlkit.__version__, nspawn_runner.__file__)")
    typer_version, _, module = libraries.stdout.split()
    assert typer_version == "0.7.0" and module.startswith("/usr/lib/python3/dist-packages/")
    # Its timers, enabled and started; the sync timer shipped but off (it needs a URL).
    assert run("systemctl", "is-enabled", *TIMERS).stdout.split() == ["enabled", "enabled"]
    assert run("systemctl", "is-active", *TIMERS).stdout.split() == ["active", "active"]
    assert run("systemctl", "is-enabled", "nspawn-runner-sync.timer",
               check=False).stdout.strip() == "disabled"
    for path in ("/usr/share/man/man1/nspawn-runner.1.gz",
                 "/usr/share/bash-completion/completions/nspawn-runner",
                 "/etc/nspawn-runner/config.toml"):
        assert Path(path).is_file(), path
    # The default settings file is all comments: the defaults, which the bed's image fits.
    shown = run("nspawn-runner", "settings", "--json").stdout
    assert '"file_exists": true' in shown
    report = run("nspawn-runner", "check", check=False)
    assert report.returncode == 0, report.stdout + report.stderr
    assert f"image {IMAGE}" in report.stdout and "boots and runs" in report.stdout

    # A runner host: the registered block completed by the package's toml --merge, and a job
    # through it.
    driver = Driver("overlay", Path(ROOTS["overlay"][0]), tmp_path / "settings.toml")
    driver.write_settings()
    config = tmp_path / "config.toml"
    config.write_text(FIXTURE.read_text())
    config.chmod(0o600)
    run("nspawn-runner", "toml", "--merge", str(config), "--default-image", IMAGE,
        NSPAWN_RUNNER_CONFIG=str(driver.settings))
    runner = tomlkit.parse(config.read_text()).unwrap()["runners"][1]
    custom = runner["custom"]
    assert {custom[f"{s}_exec"] for s in ("config", "prepare", "run", "cleanup")} == {
        "/usr/bin/nspawn-runner"}

    def argv(stage: str) -> list[str]:
        return [custom[f"{stage}_exec"], *custom[f"{stage}_args"]]

    cfg = RunnerConfig(
        config_exec=argv("config"), prepare_exec=argv("prepare"), run_exec=argv("run"),
        cleanup_exec=argv("cleanup"), prepare_exec_timeout=custom["prepare_exec_timeout"],
        graceful_kill_timeout=custom["graceful_kill_timeout"],
        force_kill_timeout=custom["force_kill_timeout"], retry_delay=0.2,
        extra_process_env={"NSPAWN_RUNNER_CONFIG": str(driver.settings)})
    result = driver.run(driver.job(["cat /etc/os-release", "echo from-the-package"],
                                   image=None), cfg)
    assert result.status == "success", result.log
    assert "from-the-package" in result.plain_log.split("$ echo from-the-package")[1]
    # The package's own units are no leftovers of the job.
    own = tuple(f"unit: nspawn-runner-{u}." for u in ("gc", "maintenance", "sync"))
    # cleanup returns once systemd has the stop; the machine's unit then reaps what it left.
    deadline = time.monotonic() + 60
    while (left := [item for item in leftovers(driver.root) if not item.startswith(own)]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left
    check = run("nspawn-runner", "check", "--no-boot", "--gitlab-config", str(config),
                NSPAWN_RUNNER_CONFIG=str(driver.settings), check=False)
    assert re.search(r"^runner nspawn on build-1\s+ok\s", check.stdout, re.M), check.stdout

    # Purge: the program, its units, timers and their state, the settings file go; what the
    # docs say is kept stays; the Python libraries apt pulled in stay until `apt autoremove`.
    run("apt-get", "purge", "-y", "nspawn-runner")
    assert "nspawn-runner" not in packages()
    after = snapshot()
    new = after - before
    left = sorted(p for p in new - not_ours(new, pulled_in) if not p.startswith(KEPT_BY_PURGE))
    assert left == [], f"left behind by the package: {left}"
    assert sorted(before - after) == [], "the purge removed what was there before"
    units = run("systemctl", "list-unit-files", "--no-legend", "nspawn-runner*",
                check=False).stdout  # status 1: none matches
    assert units.strip() == ""
    assert not shutil.which("nspawn-runner", path=PATH)
