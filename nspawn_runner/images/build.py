"""Making and provisioning one version of an image in a directory: bootstrap (mmdebstrap,
debootstrap, a command, or a tarball), provisioning (setup commands, an ansible playbook)
through systemd-nspawn, and what every CI image needs whatever its file says."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from nspawn_runner import log, proc
from nspawn_runner.errors import CommandError, SystemFailure
from nspawn_runner.host import backends
from nspawn_runner.images import transport
from nspawn_runner.images.spec import TARGET, ImageSpec
from nspawn_runner.progress import Step, run_tool, stop, wait
from nspawn_runner.settings import Settings

DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_ARCHIVES = "/var/cache/apt/archives"
# While an image is built or provisioned, dpkg skips its fsync per file (25.7 s -> 18.7 s for
# a minbase image on btrfs); finalize removes this and syncs the file system once instead.
UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/nspawn-runner-unsafe-io"
# Relative to the image root. Symlinks are tested as links: they are often absolute, which
# would lead through the host's root.
_NEEDS: dict[str, tuple[str, ...]] = {
    "an init (systemd, systemd-sysv)": ("usr/lib/systemd/systemd", "lib/systemd/systemd",
                                        "sbin/init", "usr/sbin/init"),
    "/bin/sh": ("bin/sh", "usr/bin/sh"),
    "dbus (systemd-run --machine needs it)": ("usr/bin/dbus-daemon", "usr/bin/dbus-broker",
                                              "bin/dbus-daemon"),
    "git": ("usr/bin/git", "bin/git"),
    "CA certificates (HTTPS clones)": ("etc/ssl/certs/ca-certificates.crt",
                                       "etc/pki/tls/certs/ca-bundle.crt",
                                       "etc/ssl/ca-bundle.pem", "etc/ssl/cert.pem"),
}


class ImageBuildError(SystemFailure):
    pass


@contextmanager
def _failing_as(what: str) -> Iterator[None]:
    """A failed command as what it was for ("setup command 'x'"), not as its whole argv."""
    try:
        yield
    except CommandError as e:
        lines = e.stderr.strip().splitlines()
        detail = f": {lines[-1]}" if lines else ""
        raise ImageBuildError(f"{what} failed with status {e.returncode}{detail}") from None


def host_architecture() -> str:
    result = proc.run(["dpkg", "--print-architecture"], capture=True, check=False)
    if result.returncode == 0 and result.stdout.strip():
        return result.stdout.strip()
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "i686": "i386"}.get(machine, machine)


def default_mirror() -> str:
    """The Debian mirror the host's own apt sources name (often the only one reachable),
    else deb.debian.org."""
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in src.read_text(errors="replace").splitlines():
            if line.startswith("URIs:") and "security" not in line and len(line.split()) > 1:
                return line.split()[1]
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text(errors="replace").splitlines():
            parts = [p for p in line.split() if not p.startswith("[")]
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1]
    return DEFAULT_MIRROR


def architecture(spec: ImageSpec) -> str:
    return spec.architecture or host_architecture()


def package_cache(settings: Settings, spec: ImageSpec) -> Path | None:
    """The shared download cache of the image's release and architecture (Debian images)."""
    if not spec.debian:
        return None
    return settings.package_cache_dir / f"{spec.suite}-{architecture(spec)}"


def mmdebstrap_command(spec: ImageSpec, target: Path, cache: Path, arch: str,
                       mirror: str) -> list[str]:
    return [
        "mmdebstrap",
        f"--variant={spec.variant}",
        f"--architectures={arch}",
        f"--components={','.join(spec.components)}",
        f"--include={','.join(spec.all_packages())}",
        # The package cache as mmdebstrap's manual does it: copied in before the download,
        # kept after installing, copied out before the cleanup empties the directory.
        "--skip=essential/unlink",
        f'--setup-hook=mkdir -p "$1{APT_ARCHIVES}" "$1/{Path(UNSAFE_IO).parent}"',
        f'--setup-hook=echo force-unsafe-io > "$1/{UNSAFE_IO}"',
        f"--setup-hook=sync-in {cache} {APT_ARCHIVES}/",
        f"--customize-hook=sync-out {APT_ARCHIVES} {cache}",
        *(["--verbose"] if log.verbose() else []),
        *spec.bootstrap_options,
        spec.suite,
        os.fspath(target),
        mirror,
    ]


def debootstrap_command(spec: ImageSpec, target: Path, cache: Path, arch: str,
                        mirror: str) -> list[str]:
    return [
        "debootstrap",
        *([f"--variant={spec.variant}"] if spec.variant != "default" else []),
        f"--arch={arch}",
        f"--components={','.join(spec.components)}",
        f"--include={','.join(spec.all_packages())}",
        f"--cache-dir={cache}",
        *(["--verbose"] if log.verbose() else []),
        *spec.bootstrap_options,
        spec.suite,
        os.fspath(target),
        mirror,
    ]


def command_argv(spec: ImageSpec, target: Path) -> list[str]:
    return [arg.replace(TARGET, os.fspath(target)) for arg in spec.command]


def nspawn_options(spec: ImageSpec | None, name: str, cache: Path | None = None,
                   interactive: bool = False) -> list[str]:
    """systemd-nspawn for provisioning: not registered with machined (it is no job's machine),
    the host's network for downloads, the package cache at apt's."""
    personality = spec.personality if spec else ""
    return [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--settings=no",
        f"--machine={name}",
        *([] if interactive else ["--console=pipe"]),
        *([f"--personality={personality}"] if personality else []),
        *([f"--bind={backends.escape(cache)}:{APT_ARCHIVES}"] if cache else []),
        "--setenv=DEBIAN_FRONTEND=noninteractive",
    ]


def nspawn_command(spec: ImageSpec | None, name: str, target: Path, cmd: Sequence[str],
                   cache: Path | None = None, interactive: bool = False) -> list[str]:
    """Run `cmd` in the image being made at `target`."""
    return [*nspawn_options(spec, name, cache, interactive), f"--directory={target}", "--",
            *cmd]


def _short(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 3] + "..."


def bootstrap(settings: Settings, spec: ImageSpec, target: Path) -> None:
    """Fill the empty directory `target` with a root file system."""
    if spec.bootstrap == "import":
        with (transport.fetched(spec.import_from, target.parent, spec.name) as (tarball, _),
              Step(f"unpack {spec.import_from}")):
            extract(tarball, target)
        return
    if spec.bootstrap == "command":
        with (Step(f"bootstrap with {_short(shlex.join(spec.command), 40)}"),
              _failing_as(f"the bootstrap command of {spec.file}")):
            run_tool(command_argv(spec, target))
        return
    arch = architecture(spec)
    mirror = spec.mirror or default_mirror()
    cache = package_cache(settings, spec)
    assert cache is not None
    if any(c.isspace() for c in os.fspath(cache)):
        raise ImageBuildError(f"the package cache {cache} has a space in its path, which "
                              "mmdebstrap's hooks cannot take: set package_cache")
    cache.mkdir(parents=True, exist_ok=True)
    make = mmdebstrap_command if spec.bootstrap == "mmdebstrap" else debootstrap_command
    with (Step(f"bootstrap {spec.suite} {arch} with {spec.bootstrap}"),
          _failing_as(spec.bootstrap)):
        run_tool(make(spec, target, cache, arch, mirror))
    prune_package_cache(cache, target)


def provision(settings: Settings, spec: ImageSpec, target: Path) -> None:
    """Run the file's setup commands, then its playbook, inside `target`."""
    cache = package_cache(settings, spec)
    dpkg_cfg = target / Path(UNSAFE_IO).parent
    if spec.provisioned and dpkg_cfg.is_dir() and not dpkg_cfg.is_symlink():
        _write_plain(target / UNSAFE_IO, "force-unsafe-io\n")
    for command in spec.setup:
        with Step(f"setup: {_short(command)}"), _failing_as(f"setup command {command!r}"):
            run_tool(nspawn_command(spec, spec.name, target, ["/bin/sh", "-c", command], cache))
    if spec.playbook:
        with Step(f"playbook {spec.playbook}"), _failing_as(f"playbook {spec.playbook}"):
            run_playbook(spec, target, cache)
    if cache:
        prune_package_cache(cache, target)


def run_playbook(spec: ImageSpec, target: Path, cache: Path | None) -> None:
    """ansible-playbook with the chroot connection, whose "chroot" is systemd-nspawn: modules
    then run with /proc, /sys and /dev as in a booted machine."""
    assert spec.playbook is not None
    if not spec.playbook.is_file():
        raise ImageBuildError(f"{spec.file}: playbook {spec.playbook} does not exist")
    if not shutil.which("ansible-playbook"):
        raise ImageBuildError(f"{spec.file}: a playbook needs ansible-playbook on this host: "
                              "apt-get install ansible (ansible-core lacks the chroot "
                              "connection)")
    options = nspawn_options(spec, spec.name, cache)
    with tempfile.TemporaryDirectory(prefix="nspawn-runner-ansible-") as tmp:
        wrapper = Path(tmp) / "nspawn-chroot"
        # The chroot connection runs `WRAPPER DIR /bin/sh -c CMD`.
        wrapper.write_text("#!/bin/sh\ndir=$1\nshift\n"
                           f'exec {shlex.join(options)} --directory="$dir" -- "$@"\n')
        wrapper.chmod(0o700)
        extra = {"ansible_host": os.fspath(target), "ansible_chroot_exe": os.fspath(wrapper)}
        run_tool([
            "env",
            "ANSIBLE_PIPELINING=True",
            "ANSIBLE_PYTHON_INTERPRETER=auto_silent",
            "ANSIBLE_RETRY_FILES_ENABLED=False",
            "ANSIBLE_NOCOLOR=1",
            "ansible-playbook",
            "--inventory", f"{spec.name},",
            "--connection", "community.general.chroot",
            "--extra-vars", json.dumps(extra),
            *(["-v"] if log.verbose() else []),
            os.fspath(spec.playbook),
        ])


TAR_METADATA = ["--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner"]
_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def _decompressor(archive: Path) -> Callable[[IO[bytes]], io.BufferedIOBase] | None:
    """Python's own decompressor for xz and gzip tarballs (no xz-utils needed on the host);
    None for what tar reads by itself (plain, zstd, bzip2)."""
    with open(archive, "rb") as f:
        head = f.read(6)
    if head.startswith(_XZ_MAGIC):
        return lambda f: lzma.open(f)
    if head.startswith(_GZIP_MAGIC):
        return lambda f: gzip.open(f)
    return None


def extract(archive: Path, target: Path) -> None:
    """Unpack a root file system tarball (any compression tar recognises) with ownership,
    permissions and extended attributes."""
    opts: list[str | Path] = ["--directory", target, "--same-owner", "--same-permissions",
                              *TAR_METADATA]
    decompress = _decompressor(archive)
    if decompress is None:
        run_tool(["tar", "--extract", f"--file={archive}", *opts])
        return
    child = proc.spawn(["tar", "--extract", "--file=-", *opts], stdin=subprocess.PIPE)
    assert child.stdin is not None
    try:
        with open(archive, "rb") as raw, decompress(raw) as data:
            try:
                while block := data.read(_CHUNK):
                    child.stdin.write(block)
            except BrokenPipeError:
                pass  # tar stopped reading: its status says why
            except (EOFError, lzma.LZMAError, OSError) as e:
                stop(child)
                raise ImageBuildError(f"{archive} is not a complete tarball ({e})") from None
        child.stdin.close()
    except BaseException:
        stop(child)
        raise
    code = wait(child)
    if code != 0:
        raise ImageBuildError(f"tar could not unpack {archive} (status {code}, see above)")


_COMPRESSORS = {".tar.xz": ("xz", "xz -T0"), ".tar.gz": ("gzip", "gzip -6")}


def archive(source: Path, dest: Path, fmt: str) -> None:
    """Write the tree `source` to `dest` as a tarball in `fmt` (transport.FORMATS), with
    ownership, permissions, ACLs and xattrs. xz compresses with all cores when xz-utils is
    installed, else in this process (one core, the same result)."""
    create = ["tar", "--create", f"--directory={source}", *TAR_METADATA]
    program, command = _COMPRESSORS.get(fmt, ("", ""))
    if not program or shutil.which(program):
        # The compressor is a fixed string (tar runs it through the shell).
        run_tool([*create, f"--file={dest}",
                  *([f"--use-compress-program={command}"] if command else []), "."])
        return
    child = proc.spawn([*create, "--file=-", "."], stdout=subprocess.PIPE)
    assert child.stdout is not None
    try:
        with lzma.open(dest, "wb", preset=6) as out:
            while block := child.stdout.read(_CHUNK):
                out.write(block)
    except BaseException:
        stop(child)
        raise
    code = wait(child)
    if code != 0:
        raise ImageBuildError(f"tar could not read {source} (status {code}, see above)")


def finalize(name: str, target: Path, hostname: str | None) -> None:
    """What every image gets: an empty /etc/machine-id (each boot a fresh id, and nspawn links
    no journals of a duplicate) and a host name (`hostname`; None keeps one already there)."""
    etc = target / "etc"
    if etc.is_symlink() or not etc.is_dir():
        raise ImageBuildError(f"{etc} is not a directory: this is not a root file system")
    if not (target / UNSAFE_IO).parent.is_symlink():
        (target / UNSAFE_IO).unlink(missing_ok=True)
    _write_plain(etc / "machine-id", "")
    current = etc / "hostname"
    if hostname is not None or not current.is_file() or not current.read_text().strip():
        _write_plain(current, f"{hostname or name}\n")
    enable_networkd(target)
    # What dpkg did not fsync (UNSAFE_IO) is on disk before the image can be used.
    proc.run(["sync", "--file-system", target])


def enable_networkd(target: Path) -> None:
    """A job with network = "isolated" gets its address from the machine's own networkd
    (host/network.py). Images without it are left alone: prepare says what is missing."""
    if not any(os.path.lexists(target / d / "systemd-networkd.service")
               for d in ("usr/lib/systemd/system", "lib/systemd/system")):
        log.debug(f"{target}: no systemd-networkd to enable")
        return
    proc.run(["systemctl", f"--root={target}", "--quiet", "enable",
              "systemd-networkd.service"])


def _write_plain(path: Path, text: str) -> None:
    """Write a file in an image as root without following a symlink there (it could point
    anywhere on the host)."""
    if path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def verify(spec: ImageSpec | None, name: str, target: Path) -> None:
    missing = [what for what, paths in _NEEDS.items()
               if not any(os.path.lexists(target / p) for p in paths)]
    if not missing:
        return
    if spec is not None and spec.bootstrap == "command":
        how = f"have the command in {spec.file} install them"
    elif spec is not None and spec.debian:
        how = f"check setup and packages in {spec.file}"
    else:
        how = "install them in the image (chroot-login) or in the tarball"
    raise ImageBuildError(f"image {name!r} lacks {', '.join(missing)}, which every CI image "
                          f"needs: {how}")


def prune_package_cache(cache: Path, image: Path) -> None:
    """Drop cached packages that this image just replaced with a newer version, so a rolling
    release's cache does not grow forever. Packages other images use stay."""
    result = proc.run(["dpkg-query", f"--admindir={image}/var/lib/dpkg", "--show",
                       "--showformat=${Package} ${Architecture} ${Version}\n"],
                      capture=True, check=False)
    if result.returncode != 0:
        return
    installed = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            installed[(parts[0], parts[1])] = parts[2].replace(":", "%3a")
    for deb in cache.glob("*.deb"):
        fields = deb.name.removesuffix(".deb").split("_")
        if len(fields) == 3:
            package, version, arch = fields
            if installed.get((package, arch), version) != version:
                deb.unlink(missing_ok=True)
                log.debug(f"package cache: removed {deb.name} (replaced)")
