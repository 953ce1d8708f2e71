#!/usr/bin/env python3
"""A local Debian mirror with exactly the packages of the benchmark's image, so that the test
bed builds images without reaching the network (the bed is getting its own network namespace).

bench/run makes it on this machine, where the Debian archive is reachable, keeps it in
/var/cache/nspawn-runner-bench and copies it into the bed; bench/run.py serves it on the bed's
127.0.0.1. It holds the archive's own signed InRelease and Packages index and, in pool/, the
.deb files a minbase image with IMAGE_PACKAGES needs (found by a dry mmdebstrap run), each
checked against the index: apt inside verifies it like the real archive.

    python3 bench/mirror.py [--refresh]     prints the mirror's directory (as root; mmdebstrap)
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import unquote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from testbed import mirror as machine_mirror

SUITE = "bookworm"
COMPONENT = "main"
# What every nspawn-runner image gets (images/spec.py: REQUIRED_PACKAGES) and nothing more:
# the default image of the README and of the test bed.
IMAGE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "git", "ca-certificates")
CACHE = Path("/var/cache/nspawn-runner-bench")
# The URL path the mirror is served under: http://127.0.0.1:PORT/debian
ARCHIVE = "debian"


class MirrorError(Exception):
    pass


def fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data: bytes = response.read()
            return data
    except OSError as e:
        raise MirrorError(f"cannot download {url}: {e}") from None


def release_sha256(inrelease: str) -> dict[str, tuple[str, int]]:
    """The SHA256 section of a Release file: path -> (hash, size)."""
    sums: dict[str, tuple[str, int]] = {}
    in_section = False
    for line in inrelease.splitlines():
        if line.startswith("SHA256:"):
            in_section = True
            continue
        if in_section:
            if not line.startswith(" "):
                break
            digest, size, path = line.split()
            sums[path] = (digest, int(size))
    return sums


def parse_packages(text: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """A Packages index: (package, version, architecture) -> its fields."""
    out: dict[tuple[str, str, str], dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            out[(fields["Package"], fields["Version"], fields["Architecture"])] = fields
    return out


def deb_key(filename: str) -> tuple[str, str, str]:
    """apt's archive file name name_version_arch.deb (':' quoted as %3a) as the index key."""
    package, version, arch = filename.removesuffix(".deb").split("_")
    return package, unquote(version), arch


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def architecture() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()


def key(url: str, arch: str) -> str:
    return hashlib.sha256(repr((SUITE, arch, IMAGE_PACKAGES, url)).encode()).hexdigest()[:12]


def download_debs(url: str, arch: str, out: Path) -> None:
    """The .deb files of the image, as mmdebstrap chooses them, without making an image."""
    subprocess.run([
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        f"--architectures={arch}",
        f"--components={COMPONENT}",
        f"--include={','.join(IMAGE_PACKAGES)}",
        "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1/var/cache/apt/archives"',
        f"--customize-hook=sync-out /var/cache/apt/archives {out}",
        SUITE,
        "/dev/null",
        url,
    ], check=True)


def build(target: Path, url: str, arch: str) -> None:
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        dists = work / ARCHIVE / "dists" / SUITE
        dists.mkdir(parents=True)
        inrelease = fetch(f"{url}/dists/{SUITE}/InRelease")
        (dists / "InRelease").write_bytes(inrelease)
        index_path = f"{COMPONENT}/binary-{arch}/Packages.xz"
        sums = release_sha256(inrelease.decode("utf-8", "replace"))
        if index_path not in sums:
            raise MirrorError(f"{url}/dists/{SUITE}/InRelease lists no {index_path}")
        digest, _ = sums[index_path]
        index = fetch(f"{url}/dists/{SUITE}/{index_path}")
        if hashlib.sha256(index).hexdigest() != digest:
            raise MirrorError(f"{index_path} does not match InRelease (the mirror is being "
                              "updated?): run again")
        # apt asks for the by-hash name when the Release says Acquire-By-Hash.
        for path in (dists / index_path,
                     dists / f"{COMPONENT}/binary-{arch}/by-hash/SHA256/{digest}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(index)
        packages = parse_packages(lzma.decompress(index).decode("utf-8", "replace"))
        debs = work / "debs"
        debs.mkdir()
        download_debs(url, arch, debs)
        found = sorted(debs.glob("*.deb"))
        if not found:
            raise MirrorError("mmdebstrap left no packages in its cache")
        for deb in found:
            fields = packages.get(deb_key(deb.name))
            if fields is None or fields.get("SHA256") != sha256(deb):
                raise MirrorError(f"{deb.name} is not the one in {index_path} (the mirror is "
                                  "being updated?): run again")
            dest = work / ARCHIVE / fields["Filename"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(deb, dest)
        shutil.rmtree(debs)  # apt's lock and partial/ came along
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure(refresh: bool = False) -> Path:
    """The mirror's directory, made if it is missing (or `refresh`)."""
    url = machine_mirror().rstrip("/")
    arch = architecture()
    target = CACHE / f"mirror-{SUITE}-{arch}-{key(url, arch)}"
    if refresh and target.exists():
        shutil.rmtree(target)
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"bench: making a local mirror of {len(IMAGE_PACKAGES)} packages and their "
              f"dependencies from {url} in {target}", file=sys.stderr, flush=True)
        build(target, url, arch)
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refresh", action="store_true", help="make it again")
    args = parser.parse_args(argv)
    try:
        print(ensure(args.refresh))
    except (MirrorError, subprocess.CalledProcessError) as e:
        print(f"bench: no local mirror: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
