"""A partial Debian mirror for the test bed, which has no route to the internet.

It holds the suite's indices exactly as the archive signs them (InRelease, Release, the
Packages files) and only the packages that the image builds inside the bed install (minbase
plus the given packages, as mmdebstrap and debootstrap resolve them, for each architecture).
apt and debootstrap inside the bed verify it like the real archive: Debian's signature over
the Release file, the Release file's hashes over the indices, the indices' hashes over each
package. Built once on this machine and cached; the bed serves it over HTTP.

Stdlib only, like tests/testbed.py, which calls `build`.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

COMPONENT = "main"
# What apt and debootstrap fetch besides the packages: apt takes Packages.xz, debootstrap
# Packages.gz when `xz` is not installed (as in the bed); neither needs Translation files.
INDEX_FILES = ("Packages.xz", "Packages.gz", "Release")


def _fetch(url: str) -> bytes:
    # This machine's resolver and the archive's CDN fail now and then under parallel requests.
    for attempt in range(5):
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                data: bytes = response.read()
            return data
        except OSError:
            if attempt == 4:
                raise
            time.sleep(1 + 2 * attempt)
    raise AssertionError("unreachable")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _release_sha256(release: str) -> dict[str, str]:
    """path -> sha256 from the SHA256 section of a Release file."""
    out, inside = {}, False
    for line in release.splitlines():
        if not line.startswith(" "):
            inside = line.startswith("SHA256:")
            continue
        if inside:
            digest, _size, path = line.split()
            out[path] = digest
    return out


def _stanzas(packages: str) -> dict[str, dict[str, str]]:
    """Package name -> {Filename, SHA256} of a Packages index."""
    out: dict[str, dict[str, str]] = {}
    fields: dict[str, str] = {}
    for line in packages.splitlines():
        if not line:
            if "Package" in fields:
                out[fields["Package"]] = fields
            fields = {}
        elif line.startswith(("Package: ", "Filename: ", "SHA256: ")):
            key, _, value = line.partition(": ")
            fields[key] = value
    if "Package" in fields:
        out[fields["Package"]] = fields
    return out


def _resolved(suite: str, source: str, arch: str, packages: Iterable[str]) -> set[str]:
    """The packages a minbase image with `packages` installs, as mmdebstrap (apt) and as
    debootstrap (its own resolver) pick them: they may differ in alternatives."""
    include = "--include=" + ",".join(packages)
    sim = subprocess.run(
        ["mmdebstrap", "--verbose", "--simulate", "--variant=minbase", f"--architectures={arch}",
         include, suite, "/dev/null", source],
        check=True, capture_output=True, text=True)
    names = {m.group(1).split(":")[0]
             for m in re.finditer(r"^Inst (\S+) ", sim.stdout + sim.stderr, re.MULTILINE)}
    with tempfile.TemporaryDirectory(prefix="testbed-debootstrap-") as tmp:
        deb = subprocess.run(
            ["debootstrap", "--print-debs", "--variant=minbase", f"--arch={arch}", include,
             suite, tmp, source],
            check=True, capture_output=True, text=True)
    names.update(deb.stdout.split())
    return names


def build(out: Path, suite: str, source: str, archs: Iterable[str], packages: list[str],
          log: Callable[[str], None]) -> None:
    """Make the mirror in the directory `out` (which must not exist) from the archive at
    `source` (an http:// URL)."""
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    dists = f"dists/{suite}"
    inrelease = _fetch(f"{source}/{dists}/InRelease")
    _write(tmp / dists / "InRelease", inrelease)
    release = _fetch(f"{source}/{dists}/Release")
    _write(tmp / dists / "Release", release)
    _write(tmp / dists / "Release.gpg", _fetch(f"{source}/{dists}/Release.gpg"))
    if release.decode() not in inrelease.decode():
        raise RuntimeError(f"{source}: InRelease and Release differ (a mirror update?): retry")
    digests = _release_sha256(release.decode())
    wanted: dict[str, str] = {}  # Filename -> sha256
    for arch in archs:
        index = {}
        for name in INDEX_FILES:
            path = f"{COMPONENT}/binary-{arch}/{name}"
            data = _fetch(f"{source}/{dists}/{path}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != digests.get(path):
                raise RuntimeError(f"{source}: {path} does not match the Release file: retry")
            _write(tmp / dists / path, data)
            # apt and debootstrap ask for indices by hash (the Release file says
            # Acquire-By-Hash), older tools by name.
            by_hash = tmp / dists / f"{COMPONENT}/binary-{arch}/by-hash/SHA256/{digest}"
            by_hash.parent.mkdir(parents=True, exist_ok=True)
            os.link(tmp / dists / path, by_hash)
            if name == "Packages.xz":
                index = _stanzas(lzma.decompress(data).decode())
            elif name == "Packages.gz" and not index:
                index = _stanzas(gzip.decompress(data).decode())
        names = _resolved(suite, source, arch, packages)
        missing = sorted(n for n in names if n not in index)
        if missing:
            raise RuntimeError(f"{suite}/{arch}: not in the index: {' '.join(missing)}")
        for n in names:
            wanted[index[n]["Filename"]] = index[n]["SHA256"]
        log(f"mirror: {len(names)} packages for {arch}")

    def get(item: tuple[str, str]) -> int:
        filename, digest = item
        data = _fetch(f"{source}/{filename}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise RuntimeError(f"{source}/{filename}: sha256 differs from the index")
        _write(tmp / filename, data)
        return len(data)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        size = sum(pool.map(get, sorted(wanted.items())))
    log(f"mirror: {len(wanted)} files, {size / 1e6:.0f} MB")
    os.rename(tmp, out)
