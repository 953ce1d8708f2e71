"""`nspawn-runner shell`'s checks and its systemd-nspawn command line (the run itself is an
integration test, through sudo as an ordinary user)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from nspawn_runner.local import shell
from nspawn_runner.local.transfer import Caller
from nspawn_runner.settings import Settings

ROOT = Caller(0, 0, "root", "/root")
NOBODY = Caller(65534, 65534, "nobody", "/nonexistent")


@pytest.fixture
def shared() -> object:
    """A directory others may traverse (pytest's own temp dirs are root's only)."""
    top = Path(tempfile.mkdtemp(prefix="nspawn-runner-test-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top)


@pytest.mark.parametrize("dest", ["/etc", "/etc/passwd", "/usr/local/bin", "/", "/run/x",
                                  "/var/lib/x", "/root"])
def test_binds_over_system_directories_are_refused(tmp_path: Path, dest: str) -> None:
    with pytest.raises(shell.ShellRefused, match="system directory"):
        shell.parse_bind(f"{tmp_path}:{dest}", ROOT, writable=False)


def test_bind_destination_may_not_hold_a_system_directory(tmp_path: Path) -> None:
    # /u would be fine, but "/" covers everything
    with pytest.raises(shell.ShellRefused):
        shell.parse_bind(f"{tmp_path}:/", ROOT, writable=True)


@pytest.mark.parametrize("text", ["x:relative", "x:/srv/../etc", ":/srv"])
def test_bad_bind_specs(tmp_path: Path, text: str) -> None:
    with pytest.raises(shell.ShellRefused):
        shell.parse_bind(text.replace("x", str(tmp_path), 1), ROOT, writable=False)


def test_bind_defaults_to_the_same_path_and_resolves_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    bind = shell.parse_bind(str(tmp_path / "link"), ROOT, writable=True)
    assert bind == shell.Bind(tmp_path / "real", str(tmp_path / "real"), True)
    assert shell.parse_bind(f"{tmp_path}/real:/srv/data", ROOT, False).dest == "/srv/data"


@pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user needs root")
def test_binds_are_checked_with_the_users_rights(shared: Path) -> None:
    private = shared / "private"
    private.mkdir(mode=0o700)
    readable = shared / "readable"
    readable.mkdir(mode=0o755)
    with pytest.raises(shell.ShellRefused, match="may not read"):
        shell.parse_bind(str(private), NOBODY, writable=False)
    assert shell.parse_bind(str(readable), NOBODY, writable=False).source == readable
    with pytest.raises(shell.ShellRefused, match="may not write"):
        shell.parse_bind(str(readable), NOBODY, writable=True)
    with pytest.raises(shell.ShellRefused, match="does not exist"):
        shell.parse_bind(str(shared / "none"), NOBODY, writable=False)


def test_devices_are_refused() -> None:
    with pytest.raises(shell.ShellRefused, match="not a file, directory or socket"):
        shell.parse_bind("/dev/null:/srv/null", ROOT, writable=False)


def test_default_network_follows_the_runners() -> None:
    assert [shell.default_network(n) for n in ("host", "private", "veth")] == [
        "host", "none", "private"]


def test_machine_name_is_safe() -> None:
    assert shell.machine_name(Caller(1000, 1000, "ada.lovelace@corp", "/h"), 42) == \
        "nrs-ada-lovelace-corp-42"


def test_command_line(tmp_path: Path) -> None:
    image = tmp_path / "images" / "bookworm"
    for path in ("sbin/init", "bin/bash"):
        (image / path).parent.mkdir(parents=True, exist_ok=True)
        (image / path).write_text("")
    cfg = Settings(root=tmp_path, images_config_dir=tmp_path / "conf", network="private")
    user = Caller(1000, 1000, "ada", "/home/ada")
    binds = [shell.Bind(Path("/data/a:b"), "/srv/a", False)]
    argv = shell.command_line(
        shell.Options("bookworm", ("make", "-j2")), user, cfg, "nrs-ada-1", tmp_path / "up",
        "/home/ada/src", binds, interactive=False,
        environ={"TERM": "xterm", "LANG": "C.UTF-8", "SECRET": "x", "LC_ALL": "C"})
    assert argv == [
        "systemd-nspawn", "--quiet", "--machine=nrs-ada-1", f"--directory={image}",
        f"--overlay={image}:{tmp_path}/up:/", "--settings=no", "--link-journal=no",
        "--as-pid2", "--no-new-privileges=yes", "--drop-capability=all", "--console=pipe",
        "--private-network", "--bind-ro=/etc/passwd", "--bind-ro=/etc/group",
        "--bind=/home/ada", "--bind-ro=/data/a\\:b:/srv/a", "--user=ada",
        "--chdir=/home/ada/src", "--setenv=LANG=C.UTF-8", "--setenv=LC_ALL=C",
        "--setenv=TERM=xterm", "--", "make", "-j2"]
