"""Image files and the chroot-* commands on real systemd: images made with each bootstrap
tool boot jobs; maintenance, login and import swap versions atomically while jobs run.

Every distinct image is built once per module (minbase, small) and all builds share one
package cache, so the module stays within a few minutes."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomlkit
from conftest import ROOTS, Driver, settled_leftovers, sh
from gitlab_emulator import JobResult

# Outside both state roots, so the roots' images never depend on it; kept for the session.
PACKAGE_CACHE = "/var/cache/nspawn-runner-test-packages"
TINY = {"variant": "minbase", "packages": ["less"],
        "setup": ["echo built-by-setup > /etc/nr-setup"]}


def guest_tarball() -> str:
    """The test bed's job image as a tarball: a `command` bootstrap that works offline."""
    found = Path("/testbed-guest.tar.zst")
    assert found.is_file(), "the test bed binds its job image's tarball there"
    return str(found)


def nr(driver: Driver, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": str(driver.settings)}
    result = subprocess.run(["nspawn-runner", *args], env=env, capture_output=True, text=True,
                            timeout=900)
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


def write_file(files: Path, name: str, **values: object) -> None:
    (files / f"{name}.toml").write_text(tomlkit.dumps(values))


def cmd_file(files: Path, name: str, setup: list[str], **extra: object) -> None:
    write_file(files, name, bootstrap="command",
               command=["tar", "--zstd", "-xpf", guest_tarball(), "-C", "{target}"],
               setup=setup, **extra)


def aside(driver: Driver) -> list[str]:
    """Versions in the making or swapped out, in the images directory."""
    return sorted(p.name for p in (driver.root / "images").iterdir()
                  if p.name.startswith((".tmp-", ".old-")))


def prune(driver: Driver) -> None:
    code = ("from pathlib import Path; from nspawn_runner import settings; "
            "from nspawn_runner.executor import state; from nspawn_runner.images import store; "
            f"store.prune_old_versions(settings.load(Path({str(driver.settings)!r})), "
            "state.image_uses())")
    subprocess.run(["/opt/nspawn-runner/bin/python", "-c", code], check=True)


def run_ok(driver: Driver, image: str, script: list[str]) -> str:
    result = driver.run(driver.job(script, image=image))
    assert result.status == "success", result.log
    return result.plain_log


class Background:
    """A job that reports the image version it sees, then waits until released."""

    def __init__(self, driver: Driver, image: str) -> None:
        self.driver = driver
        self.job = driver.job(['echo "seen:$(cat /etc/nr-version)"',
                               "until [ -e /run/go ]; do sleep 0.2; done",
                               'echo "later:$(cat /etc/nr-version)"'], image=image)
        self.seen = threading.Event()
        self.result: JobResult | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.seen.wait(120), "the background job did not start"

    def _live(self, line: str) -> None:
        if line.startswith("seen:"):
            self.seen.set()

    def _run(self) -> None:
        self.result = self.driver.run(self.job, live_output=self._live)

    @property
    def machine(self) -> str:
        names = [line.split()[0] for line in sh("machinectl", "list", "--no-legend").splitlines()
                 if line.startswith(f"nr-{self.job.job_id}-")]
        assert names, "the background job's machine is gone"
        return names[0]

    def release(self) -> JobResult:
        sh("systemd-run", "--quiet", f"--machine={self.machine}", "--wait", "/bin/touch",
           "/run/go")
        self.thread.join(120)
        assert self.result is not None
        return self.result


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images.d")


@pytest.fixture(scope="module")
def drivers(tmp_path_factory: pytest.TempPathFactory, files: Path) -> Iterator[dict[str, Driver]]:
    out = {}
    for backend in ("btrfs", "overlay"):
        d = Driver(backend, Path(ROOTS[backend][0]),
                   tmp_path_factory.mktemp(backend) / "config.toml")
        d.write_settings(images_config_dir=str(files), package_cache=PACKAGE_CACHE)
        out[backend] = d
    before = {b: set(os.listdir(d.root / "images")) for b, d in out.items()}
    yield out
    # Other modules expect only the test bed's image.
    for b, d in out.items():
        for name in sorted(set(os.listdir(d.root / "images")) - before[b]):
            if not name.startswith("."):
                nr(d, "chroot-remove", "--force", name)
        prune(d)
        for lock in (d.root / "images").glob(".lock-*"):
            lock.unlink()


@pytest.fixture(autouse=True)
def nothing_left(drivers: dict[str, Driver]) -> Iterator[None]:
    yield
    for d in drivers.values():
        settled = settled_leftovers(d.root)
        prune(d)
        left = settled + aside(d)
        assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def mm_image(drivers: dict[str, Driver], files: Path) -> tuple[Driver, str]:
    write_file(files, "t-mm", bootstrap="mmdebstrap", suite="bookworm", **TINY)
    out = nr(drivers["btrfs"], "chroot-create", "t-mm").stderr
    assert "bootstrap bookworm amd64 with mmdebstrap ... done in" in out, out
    assert "setup: echo built-by-setup > /etc/nr-setup ... done in" in out, out
    return drivers["btrfs"], "t-mm"


def check_tiny(driver: Driver, name: str) -> None:
    image = driver.root / "images" / name
    assert (image / "etc" / "machine-id").read_text() == ""
    assert (image / "etc" / "hostname").read_text() == f"{name}\n"
    assert not (image / "etc/dpkg/dpkg.cfg.d/nspawn-runner-unsafe-io").exists()
    # Enabled, for network = "isolated" (host/network.py).
    wants = image / "etc/systemd/system/multi-user.target.wants"
    assert (wants / "systemd-networkd.service").is_symlink()
    log = run_ok(driver, name, ["cat /etc/nr-setup", "less --version | head -n 1",
                                "git --version", "test -s /etc/ssl/certs/ca-certificates.crt",
                                "echo ca-ok", "test -z \"$(cat /etc/machine-id)\" || echo booted"])
    assert "built-by-setup" in log and "less " in log and "git version" in log
    assert "ca-ok" in log


def test_mmdebstrap_image_from_file_boots_a_job(mm_image: tuple[Driver, str]) -> None:
    driver, name = mm_image
    assert (driver.root / "images" / name).stat().st_ino == 256, "a btrfs subvolume"
    check_tiny(driver, name)
    assert list(Path(PACKAGE_CACHE, "bookworm-amd64").glob("less_*.deb")), "cached packages"


def test_debootstrap_image_from_file_boots_a_job(drivers: dict[str, Driver],
                                                 files: Path) -> None:
    driver = drivers["overlay"]
    write_file(files, "t-deb", bootstrap="debootstrap", suite="bookworm", **TINY)
    out = nr(driver, "chroot-create", "t-deb").stderr
    assert "bootstrap bookworm amd64 with debootstrap ... done in" in out, out
    check_tiny(driver, "t-deb")


def test_i386_image_reports_i686(drivers: dict[str, Driver], files: Path) -> None:
    driver = drivers["btrfs"]
    write_file(files, "t-i386", suite="bookworm", architecture="i386", variant="minbase")
    nr(driver, "chroot-create", "t-i386")
    image = str(driver.root / "images" / "t-i386")
    direct = sh("systemd-nspawn", "--quiet", "--register=no", "--personality=x86", "-D", image,
                "uname", "-m")
    assert direct.strip() == "i686"
    log = run_ok(driver, "t-i386", ['echo "arch=$(uname -m) $(dpkg --print-architecture)"'])
    assert "arch=i686 i386" in log


@pytest.mark.parametrize("backend", ["overlay", "btrfs"])
def test_maintenance_while_a_job_runs(drivers: dict[str, Driver], files: Path,
                                      backend: str) -> None:
    driver = drivers[backend]
    cmd_file(files, "t-cmd", ["echo v1 > /etc/nr-version"])
    out = nr(driver, "chroot-create", "t-cmd").stderr
    assert "bootstrap with tar" in out
    running = Background(driver, "t-cmd")
    listed = {r["name"]: r for r in json.loads(nr(driver, "chroot-list", "--json").stdout)}
    assert listed["t-cmd"]["jobs"] == [running.machine]
    refused = nr(driver, "chroot-remove", "t-cmd", check=False)
    assert refused.returncode == 2 and "used by 1 running job" in refused.stderr

    cmd_file(files, "t-cmd", ["echo v2 > /etc/nr-version"])
    report = nr(driver, "chroot-maintenance", "t-cmd").stdout
    assert "t-cmd  provisioned" in report
    assert [n for n in aside(driver) if n.startswith(".old-t-cmd@")], "kept for the running job"
    new = run_ok(driver, "t-cmd", ['echo "next:$(cat /etc/nr-version)"'])
    assert "next:v2" in new

    old = running.release()
    assert old.status == "success", old.log
    assert "seen:v1" in old.plain_log and "later:v1" in old.plain_log
    # The old job's unit removes the version it was the last user of, after cleanup returned.
    assert not settled_leftovers(driver.root)
    assert not aside(driver), "removed once its last job ended"
    nr(driver, "chroot-remove", "t-cmd")


def test_maintenance_recreates_old_or_changed_images(drivers: dict[str, Driver],
                                                     files: Path) -> None:
    driver = drivers["btrfs"]

    def maintain() -> str:
        line = nr(driver, "chroot-maintenance", "t-age").stdout.splitlines()[1]
        return line.removeprefix("t-age").strip().rsplit(None, 1)[0]

    write_file(files, "t-age", command=["tar", "--zstd", "-xpf", guest_tarball(), "-C",
                                        "{target}"])
    assert maintain() == "created"
    assert maintain() == "up to date (nothing to run)"
    created = json.loads((driver.root / "images/t-age/etc/nspawn-runner/image.json")
                         .read_text())["created"]
    write_file(files, "t-age", recreate_after=1, setup=["true"],
               command=["tar", "--zstd", "-xpf", guest_tarball(), "-C", "{target}"])
    time.sleep(1.1)
    assert maintain() == "recreated (older than 1s)"
    meta = json.loads((driver.root / "images/t-age/etc/nspawn-runner/image.json").read_text())
    assert meta["created"] > created
    write_file(files, "t-age", setup=["true"],
               command=["tar", "--warning=no-timestamp", "--zstd", "-xpf", guest_tarball(),
                        "-C", "{target}"])
    assert maintain() == "recreated (file changed)"
    assert maintain() == "provisioned"
    nr(driver, "chroot-remove", "t-age")


def test_failed_provisioning_leaves_the_image_intact(drivers: dict[str, Driver],
                                                     files: Path) -> None:
    driver = drivers["overlay"]
    cmd_file(files, "t-fail", ["echo v1 > /etc/nr-version"])
    nr(driver, "chroot-create", "t-fail")
    cmd_file(files, "t-fail", ["echo v2 > /etc/nr-version", "echo going-wrong; exit 3"])
    cmd_file(files, "t-other", ["echo other > /etc/nr-version"])
    result = nr(driver, "chroot-maintenance", "t-fail", "t-other", check=False)
    assert result.returncode == 2, result.stderr
    assert "going-wrong" in result.stderr  # the failed command's output, without --verbose
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "FAILED" in lines["t-fail"] and "status 3" in lines["t-fail"]
    assert "created" in lines["t-other"], "one failing image does not stop the others"
    assert (driver.root / "images/t-fail/etc/nr-version").read_text() == "v1\n"
    assert not aside(driver)
    # A new image whose provisioning fails leaves nothing at all.
    cmd_file(files, "t-broken", ["exit 1"])
    assert nr(driver, "chroot-create", "t-broken", check=False).returncode == 2
    assert not (driver.root / "images" / "t-broken").exists() and not aside(driver)
    for name in ("t-fail", "t-other"):
        nr(driver, "chroot-remove", name)


def test_login_swaps_atomically(drivers: dict[str, Driver], files: Path) -> None:
    driver = drivers["overlay"]
    cmd_file(files, "t-login", ["echo v1 > /etc/nr-version"])
    nr(driver, "chroot-create", "t-login")
    image = driver.root / "images" / "t-login"
    nr(driver, "chroot-login", "t-login", "--", "sh", "-c", "echo kept > /etc/nr-login")
    assert (image / "etc/nr-login").read_text() == "kept\n"
    failed = nr(driver, "chroot-login", "t-login", "--", "sh", "-c",
                "echo dropped > /etc/nr-login; exit 1", check=False)
    assert failed.returncode == 2 and "discarded" in failed.stderr
    assert (image / "etc/nr-login").read_text() == "kept\n"

    # A login in progress blocks no job, and no job sees its changes until it ends.
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": str(driver.settings)}
    login = subprocess.Popen(
        ["nspawn-runner", "chroot-login", "t-login", "--", "sh", "-c",
         "echo v2 > /etc/nr-version; until [ -e /var/tmp/release ]; do sleep 0.1; done; "
         "rm /var/tmp/release"], env=env, stderr=subprocess.PIPE, text=True)
    copies: list[Path] = []
    try:
        for _ in range(300):
            copies = list((driver.root / "images").glob(".tmp-t-login@*"))
            # On ext4 the copy is still being made for a while: its files appear one by one.
            if copies and _read(copies[0] / "etc/nr-version") == "v2\n":
                break
            time.sleep(0.1)
        else:
            pytest.fail("the login did not start")
        during = run_ok(driver, "t-login", ['echo "during:$(cat /etc/nr-version)"'])
        assert "during:v1" in during
        (copies[0] / "var/tmp/release").touch()
    except BaseException:
        login.terminate()  # the driver then removes its copy: never leave the login behind
        login.communicate(timeout=60)
        raise
    _, err = login.communicate(timeout=60)
    assert login.returncode == 0, err
    after = run_ok(driver, "t-login", ['echo "after:$(cat /etc/nr-version)"'])
    assert "after:v2" in after
    settled_leftovers(driver.root)  # the job's machine is gone, not only asked to stop
    nr(driver, "chroot-remove", "t-login")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_export_then_import_boots(mm_image: tuple[Driver, str], drivers: dict[str, Driver],
                                  tmp_path: Path) -> None:
    source, name = mm_image
    nr(source, "chroot-login", name, "--", "chown", "1234:5678", "/etc/nr-setup")
    os.setxattr(source.root / "images" / name / "etc/nr-setup", "user.nr", b"kept")
    # gzip: fast here; the default (a directory gets NAME.tar.xz) is in test_multi_host.py.
    tarball = tmp_path / f"{name}.tar.gz"
    nr(source, "chroot-export", name, str(tarball))
    assert tarball.stat().st_size > 10_000_000
    assert (tmp_path / "SHA256SUMS").read_text().endswith(f"  {tarball.name}\n")

    # Another host: the other state root, from a URL.
    target = drivers["overlay"]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{tarball.name}"
        out = nr(target, "chroot-import", "t-imported", url).stderr
    finally:
        server.shutdown()
    assert "check that it is a complete image and runs ... done" in out
    imported = target.root / "images" / "t-imported"
    st = (imported / "etc/nr-setup").stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert os.getxattr(imported / "etc/nr-setup", "user.nr") == b"kept"
    assert "built-by-setup" in run_ok(target, "t-imported", ["cat /etc/nr-setup"])

    # A damaged file replaces nothing: its checksum is not the listed one.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / tarball.name).write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    (broken / "SHA256SUMS").write_bytes((tmp_path / "SHA256SUMS").read_bytes())
    failed = nr(target, "chroot-import", "t-imported", str(broken / tarball.name), check=False)
    assert failed.returncode == 2 and "the file is damaged or was replaced" in failed.stderr
    assert (imported / "etc/nr-setup").stat().st_uid == 1234
    nr(target, "chroot-remove", "--yes", "t-imported")


def test_playbook_provisions_through_nspawn(drivers: dict[str, Driver], files: Path,
                                            tmp_path: Path) -> None:
    driver = drivers["btrfs"]
    playbook = tmp_path / "site.yml"
    # raw: the test bed's image has no python3 for ansible's modules.
    playbook.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n"
                        "    - raw: echo \"played in $(systemd-detect-virt)\" > /etc/nr-played\n")
    cmd_file(files, "t-play", [], playbook=str(playbook))
    out = nr(driver, "chroot-create", "t-play").stderr
    assert f"playbook {playbook} ... done" in out
    played = (driver.root / "images/t-play/etc/nr-played").read_text()
    assert played == "played in systemd-nspawn\n"
    nr(driver, "chroot-remove", "t-play")


def test_bad_image_file_names_file_key_and_value(drivers: dict[str, Driver],
                                                 files: Path) -> None:
    driver = drivers["overlay"]
    write_file(files, "t-bad", suite="bookworm", variant="tiny")
    result = nr(driver, "chroot-create", "t-bad", check=False)
    assert result.returncode == 2
    assert f"{files}/t-bad.toml: invalid value 'tiny' for 'variant'" in result.stderr
    assert not (driver.root / "images" / "t-bad").exists()


def test_remove_with_force_keeps_the_running_job(drivers: dict[str, Driver],
                                                 files: Path) -> None:
    driver = drivers["overlay"]
    cmd_file(files, "t-rm", ["echo v1 > /etc/nr-version"])
    nr(driver, "chroot-create", "t-rm")
    running = Background(driver, "t-rm")
    nr(driver, "chroot-remove", "--force", "t-rm")
    assert not (driver.root / "images" / "t-rm").exists()
    result = running.release()
    assert result.status == "success" and "later:v1" in result.plain_log, result.log
