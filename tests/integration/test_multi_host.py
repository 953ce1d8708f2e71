"""Images shared between runner hosts, on real systemd. chroot-export writes what systemd's own
importer accepts (`machinectl pull-tar` imports it); two state roots stand for two hosts: one
exports, a web server in the bed (python3 -m http.server on 127.0.0.1) serves the directory,
the other follows it with chroot-sync and runs a job on the synced image; a changed image is
swapped in, a damaged download changes nothing."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOTS, Driver, leftovers, sh

_names = itertools.count(int(time.time()) % 100000)


def nr(settings: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": str(settings)}
    result = subprocess.run(["nspawn-runner", *args], env=env, capture_output=True, text=True,
                            timeout=900)
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A directory served over HTTP by `python3 -m http.server` on 127.0.0.1."""
    directory = tmp_path / "www"
    directory.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(directory)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/", directory
    finally:
        server.terminate()
        server.wait()


def tiny_image(root: Path, name: str) -> Path:
    image = root / "images" / name
    (image / "etc").mkdir(parents=True)
    (image / "etc/marker").write_text("tiny\n")
    os.chown(image / "etc/marker", 1234, 5678)
    (image / "usr/bin").mkdir(parents=True)
    (image / "bin").symlink_to("usr/bin")
    return image


@pytest.mark.parametrize("fmt", [".tar.xz", ".tar.gz", ".tar"])
def test_machinectl_pull_tar_imports_an_export(tmp_path: Path, served: tuple[str, Path],
                                              fmt: str) -> None:
    url, www = served
    root = tmp_path / "root"
    tiny_image(root, "tiny")
    settings = tmp_path / "settings.toml"
    settings.write_text(f'root = "{root}"\n')
    nr(settings, "chroot-export", "tiny", str(www / f"tiny{fmt}"))
    sums = (www / "SHA256SUMS").read_text()
    assert sums.endswith(f"  tiny{fmt}\n") and len(sums.split()[0]) == 64
    machine = f"nr-pulltest-{next(_names)}"
    pulled = subprocess.run(["machinectl", "pull-tar", "--verify=checksum", f"{url}tiny{fmt}",
                             machine], capture_output=True, text=True, timeout=300)
    # importd keeps an immutable copy of every download (.tar-URL) for later pulls:
    # `machinectl clean` removes those hidden images.
    try:
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        imported = Path("/var/lib/machines") / machine
        assert (imported / "etc/marker").read_text() == "tiny\n"
        st = (imported / "etc/marker").stat()
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert os.readlink(imported / "bin") == "usr/bin"
    finally:
        subprocess.run(["machinectl", "remove", machine], capture_output=True, check=False)
        subprocess.run(["machinectl", "clean"], capture_output=True, check=False)
    # A wrong checksum is refused by systemd's importer too: the format is the same.
    (www / "SHA256SUMS").write_text(f"{'0' * 64}  tiny{fmt}\n")
    refused = subprocess.run(["machinectl", "pull-tar", "--verify=checksum", f"{url}tiny{fmt}",
                              machine], capture_output=True, text=True, timeout=300)
    subprocess.run(["machinectl", "remove", machine], capture_output=True, check=False)
    subprocess.run(["machinectl", "clean"], capture_output=True, check=False)
    assert refused.returncode != 0
    assert not list(Path("/var/lib/machines").glob(".tar-*")), "importd's hidden copies"


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[Driver, Driver]]:
    """Host A: the bed's ext4 state root, with a copy of the test image to change. Host B:
    a new btrfs state root that has no image yet."""
    a = Driver("overlay", Path(ROOTS["overlay"][0]), tmp_path / "a.toml")
    a.write_settings()
    b_root = Path(ROOTS["btrfs"][0]).parent / f"nrtest-host-b-{next(_names)}"
    b_root.mkdir()
    b = Driver("btrfs", b_root, tmp_path / "b.toml")
    b.write_settings()
    a.make_image("t-share")
    try:
        yield a, b
    finally:
        for driver in (a, b):
            nr(driver.settings, "chroot-remove", "--yes", "--force", "t-share", check=False)
            nr(driver.settings, "gc", "--grace", "0", check=False)
        for lock in (a.root / "images").glob(".lock-t-share"):
            lock.unlink()
        sh("rm", "-rf", "--one-file-system", str(b_root), check=False)
    assert not leftovers(a.root) and not leftovers(b.root)


def sync(b: Driver, url: str, *args: str, check: bool = True) -> dict[str, dict[str, object]]:
    result = nr(b.settings, "chroot-sync", url, "--json", *args, check=check)
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_two_hosts_follow_one_build_host(two_hosts: tuple[Driver, Driver],
                                         served: tuple[str, Path]) -> None:
    a, b = two_hosts
    url, www = served
    # The build host exports; gzip keeps this test fast (docs/multi-host.md: xz is the default).
    nr(a.settings, "chroot-export", "t-share", str(www / "t-share.tar.gz"))
    first = sync(b, url)
    assert first["t-share"]["action"] == "created" and first["t-share"]["ok"] is True
    image = b.root / "images" / "t-share"
    assert image.stat().st_ino == 256, "a btrfs subvolume on the btrfs host"
    meta = json.loads((image / "etc/nspawn-runner/image.json").read_text())
    assert meta["imported_from"] == f"{url}t-share.tar.gz"
    result = b.run(b.job(["cat /etc/os-release", "systemctl is-system-running --wait || true"],
                         image="t-share"))
    assert result.status == "success", result.log
    assert "Debian GNU/Linux" in result.log

    again = sync(b, url)
    assert again["t-share"]["action"] == "up to date"
    assert json.loads((image / "etc/nspawn-runner/image.json").read_text()) == meta

    # The build host changes the image and exports it again: the follower swaps it in.
    nr(a.settings, "chroot-login", "t-share", "--", "sh", "-c", "echo v2 > /etc/nr-version")
    nr(a.settings, "chroot-export", "t-share", str(www / "t-share.tar.gz"))
    changed = sync(b, url, "t-share")
    assert changed["t-share"]["action"] == "updated"
    result = b.run(b.job(["cat /etc/nr-version"], image="t-share"))
    assert result.status == "success" and "v2" in result.plain_log.split("$ cat")[1]

    # A damaged upload (the list updated, the file cut short): refused, nothing changes.
    tarball = www / "t-share.tar.gz"
    tarball.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 3])
    sums = (www / "SHA256SUMS").read_text().splitlines()
    (www / "SHA256SUMS").write_text("".join(
        f"{'f' * 64}  t-share.tar.gz\n" if line.endswith("t-share.tar.gz") else line + "\n"
        for line in sums))
    failed = nr(b.settings, "chroot-sync", url, check=False)
    assert failed.returncode == 2
    assert "is not the " + "f" * 64 in failed.stderr and "nothing was changed" in failed.stderr
    assert "FAILED" in failed.stdout
    assert (image / "etc/nr-version").read_text() == "v2\n"
    assert not [p.name for p in (b.root / "images").iterdir()
                if p.name.startswith((".tmp-", ".old-"))]


def test_import_verifies_the_checksum(two_hosts: tuple[Driver, Driver],
                                      served: tuple[str, Path], tmp_path: Path) -> None:
    a, b = two_hosts
    url, www = served
    nr(a.settings, "chroot-export", "t-share", str(www / "t-share.tar.gz"))
    # Without SHA256SUMS beside it, a tarball is refused unless --verify=no.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "t-share.tar.gz").write_bytes((www / "t-share.tar.gz").read_bytes())
    refused = nr(b.settings, "chroot-import", "t-share", str(lone / "t-share.tar.gz"),
                 check=False)
    assert refused.returncode == 2 and "--verify=no" in refused.stderr
    assert not (b.root / "images" / "t-share").exists()
    nr(b.settings, "chroot-import", "t-share", f"{url}t-share.tar.gz")
    assert (b.root / "images/t-share/etc/os-release").exists()
