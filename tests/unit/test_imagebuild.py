"""Image builds: command lines compared as lists, what every image gets, the package cache."""

import subprocess
from pathlib import Path

import pytest

from nspawn_runner import log, proc
from nspawn_runner.images import build
from nspawn_runner.images import spec as image_file
from nspawn_runner.images.build import ImageBuildError
from nspawn_runner.images.spec import ImageSpec
from nspawn_runner.settings import Settings


def spec(**data: object) -> ImageSpec:
    data.setdefault("suite", "bookworm")
    data.setdefault("bootstrap", "mmdebstrap")
    return image_file.parse("tiny", data, Path("/etc/nspawn-runner/images/tiny.toml"))


def test_mmdebstrap_command() -> None:
    cmd = build.mmdebstrap_command(spec(packages=["less"], bootstrap_options=["--aptopt=x"]),
                                        Path("/r/images/.tmp-tiny@1"), Path("/r/cache/b"),
                                        "amd64", "http://deb.debian.org/debian")
    assert cmd == [
        "mmdebstrap", "--variant=minbase", "--architectures=amd64", "--components=main",
        "--include=systemd,systemd-sysv,dbus,git,ca-certificates,less",
        "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1/var/cache/apt/archives" "$1/etc/dpkg/dpkg.cfg.d"',
        '--setup-hook=echo force-unsafe-io > "$1/etc/dpkg/dpkg.cfg.d/nspawn-runner-unsafe-io"',
        "--setup-hook=sync-in /r/cache/b /var/cache/apt/archives/",
        "--customize-hook=sync-out /var/cache/apt/archives /r/cache/b",
        "--aptopt=x", "bookworm", "/r/images/.tmp-tiny@1", "http://deb.debian.org/debian",
    ]


def test_mmdebstrap_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_verbose", True)
    cmd = build.mmdebstrap_command(spec(), Path("/t"), Path("/c"), "i386", "http://m")
    assert "--verbose" in cmd and "--architectures=i386" in cmd


@pytest.mark.parametrize(("variant", "flags"), [("minbase", ["--variant=minbase"]),
                                                ("default", [])])
def test_debootstrap_command(variant: str, flags: list[str]) -> None:
    cmd = build.debootstrap_command(
        spec(bootstrap="debootstrap", variant=variant, components=["main", "contrib"]),
        Path("/t"), Path("/c/bookworm-i386"), "i386", "http://m/debian")
    assert cmd == ["debootstrap", *flags, "--arch=i386", "--components=main,contrib",
                   "--include=systemd,systemd-sysv,dbus,git,ca-certificates",
                   "--cache-dir=/c/bookworm-i386", "bookworm", "/t", "http://m/debian"]


def test_command_argv() -> None:
    s = spec(bootstrap="command", command=["dnf", "--installroot={target}", "install", "x"])
    assert build.command_argv(s, Path("/r/images/.tmp-f@1")) == [
        "dnf", "--installroot=/r/images/.tmp-f@1", "install", "x"]


def test_nspawn_command() -> None:
    s = spec(architecture="i386")
    assert build.nspawn_command(s, "tiny", Path("/r/images/.tmp-tiny@1"),
                                     ["/bin/sh", "-c", "apt-get update"],
                                     Path("/r/package-cache/bookworm-i386")) == [
        "systemd-nspawn", "--quiet", "--register=no", "--settings=no", "--machine=tiny",
        "--console=pipe", "--personality=x86",
        "--bind=/r/package-cache/bookworm-i386:/var/cache/apt/archives",
        "--setenv=DEBIAN_FRONTEND=noninteractive",
        "--directory=/r/images/.tmp-tiny@1", "--", "/bin/sh", "-c", "apt-get update",
    ]
    interactive = build.nspawn_command(None, "x", Path("/i"), [], None, interactive=True)
    assert "--console=pipe" not in interactive and interactive[-1] == "--"


def test_package_cache_per_release_and_architecture(tmp_path: Path) -> None:
    cfg = Settings(root=tmp_path)
    assert build.package_cache(cfg, spec(architecture="i386")) == \
        tmp_path / "package-cache" / "bookworm-i386"
    assert build.package_cache(Settings(root=tmp_path, package_cache="/c"),
                                    spec(suite="sid", architecture="arm64")) == Path("/c/sid-arm64")
    assert build.package_cache(cfg, spec(bootstrap="command", command=["{target}"])) is None


def make_root(path: Path) -> Path:
    for rel in ("usr/lib/systemd", "usr/bin", "etc/ssl/certs", "bin"):
        (path / rel).mkdir(parents=True, exist_ok=True)
    for rel in ("usr/lib/systemd/systemd", "usr/bin/dbus-daemon", "usr/bin/git",
                "etc/ssl/certs/ca-certificates.crt"):
        (path / rel).touch()
    (path / "bin/sh").symlink_to("/usr/bin/dash")  # absolute: tested as a link
    return path


def test_verify(tmp_path: Path) -> None:
    root = make_root(tmp_path / "img")
    build.verify(spec(), "tiny", root)
    (root / "usr/bin/git").unlink()
    (root / "etc/ssl/certs/ca-certificates.crt").unlink()
    with pytest.raises(ImageBuildError, match="lacks git, CA certificates .* check setup"):
        build.verify(spec(), "tiny", root)


def test_finalize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[list[str]] = []
    monkeypatch.setattr(proc, "run", lambda cmd, **kw: synced.append([str(c) for c in cmd]))
    root = make_root(tmp_path / "img")
    outside = tmp_path / "host-file"
    outside.write_text("precious")
    (root / "etc/machine-id").symlink_to(outside)  # never written through
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True)
    (root / build.UNSAFE_IO).write_text("force-unsafe-io\n")
    build.finalize("tiny", root, None)
    assert outside.read_text() == "precious"
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "etc/hostname").read_text() == "tiny\n"
    assert not (root / build.UNSAFE_IO).exists()
    assert synced == [["sync", "--file-system", str(root)]]
    build.finalize("tiny", root, None)
    assert (root / "etc/hostname").read_text() == "tiny\n", "kept"
    build.finalize("tiny", root, "ci")
    assert (root / "etc/hostname").read_text() == "ci\n"


def test_prune_package_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    names = ["bash_5.2-1_amd64.deb", "bash_5.2-2_amd64.deb", "libcap2_1%3a2.66-4_amd64.deb",
             "libcap2_1%3a2.66-3_amd64.deb", "other_1.0_all.deb", "lock"]
    for name in names:
        (cache / name).touch()

    def fake(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 0, "bash amd64 5.2-2\nlibcap2 amd64 1:2.66-4\n",
                                           "")

    monkeypatch.setattr(proc, "run", fake)
    build.prune_package_cache(cache, tmp_path / "img")
    assert sorted(p.name for p in cache.iterdir()) == [
        "bash_5.2-2_amd64.deb", "libcap2_1%3a2.66-4_amd64.deb", "lock", "other_1.0_all.deb"]
