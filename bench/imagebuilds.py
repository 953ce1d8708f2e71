"""Part (5): `nspawn-runner chroot-create` of the default image, cold and with a warm
package cache, from the local mirror bench/mirror.py made (served here on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import report
from mirror import ARCHIVE, IMAGE_PACKAGES, SUITE
from variants import NR, BenchError, log, sh

# Image builds get their own state root on the bed's btrfs, removed afterwards.
IMAGES_ROOT = Path("/srv/btrfs/bench-images")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """The local mirror on this host's loopback: its URL."""
    if not (directory / ARCHIVE / "dists" / SUITE / "InRelease").is_file():
        raise BenchError(f"{directory} is no mirror made by bench/mirror.py (no "
                         f"{ARCHIVE}/dists/{SUITE}/InRelease)")
    handler = functools.partial(QuietHandler, directory=os.fspath(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{ARCHIVE}"
    finally:
        server.shutdown()
        server.server_close()


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_tree(root: Path) -> None:
    """`root` and the btrfs subvolumes in it (image versions left aside, say)."""
    images_dir = root / "images"
    if images_dir.is_dir():
        for path in images_dir.iterdir():
            # The root directory of a btrfs subvolume has inode 256.
            if path.is_dir() and not path.is_symlink() and path.stat().st_ino == 256:
                sh("btrfs", "-q", "subvolume", "delete", os.fspath(path), check=False)
    shutil.rmtree(root, ignore_errors=True)


def images(rounds: int, mirror: str | None) -> dict[str, Any]:
    """chroot-create of the default image (minbase and what every image gets) with an empty
    package cache, then with the one the cold build left, interleaved. `mirror`: the URL of
    the local mirror; None: the bed's own apt mirror."""
    root = IMAGES_ROOT
    remove_tree(root)
    files, cache = root / "images.d", root / "package-cache"
    files.mkdir(parents=True)
    settings = root / "config.toml"
    settings.write_text(f'root = "{root}"\nimages_config_dir = "{files}"\n'
                        f'package_cache = "{cache}"\n')
    spec = ('bootstrap = "mmdebstrap"\nsuite = "bookworm"\nvariant = "minbase"\n'
            f"packages = {json.dumps(list(IMAGE_PACKAGES))}\n")
    spec += f'mirror = "{mirror}"\n' if mirror else ""
    (files / "bench.toml").write_text(spec)
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": os.fspath(settings)}

    def build() -> float:
        start = time.perf_counter()
        result = subprocess.run([NR, "chroot-create", "bench"], env=env, capture_output=True,
                                text=True, timeout=1800)
        took = time.perf_counter() - start
        if result.returncode != 0:
            raise BenchError(f"chroot-create failed ({result.returncode}):\n"
                             f"{result.stdout[-2000:]}{result.stderr[-3000:]}")
        return took

    cold: list[float] = []
    warm: list[float] = []
    downloaded = 0
    try:
        for r in range(rounds):
            shutil.rmtree(cache, ignore_errors=True)
            cold.append(build())
            downloaded = tree_bytes(cache)
            warm.append(build())
            log(f"images round {r + 1}/{rounds}: cold {cold[-1]:.1f}s, warm {warm[-1]:.1f}s")
        size = int(sh("du", "-sb", os.fspath(root / "images" / "bench")).split()[0])
    finally:
        if (root / "images" / "bench").exists():
            subprocess.run([NR, "chroot-remove", "bench"], env=env, capture_output=True)
        remove_tree(root)
    return {"cold": report.summary(cold), "warm": report.summary(warm),
            "package_cache_bytes": downloaded, "image_bytes": size,
            "mirror": f"local mirror (bench/mirror.py) at {mirror}" if mirror
            else "the bed's own apt mirror (network)",
            "packages": list(IMAGE_PACKAGES)}
