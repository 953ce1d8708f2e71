"""Every path the driver uses: under the state root, under /run, and inside a job's machine.

One place, so that prepare, run, cleanup, gc, the image commands and check agree on them, and
a reader sees the whole tree at once:

    <root>/images/NAME                  image versions (images/store.py)
    <root>/overlays/MACHINE/upper       a job's writable layer on the overlay backend
    <root>/cache/SERVER/GROUP/PROJECT   caches, bound at <cache_dir>/GROUP/PROJECT
    <root>/builds/SERVER/GROUP/PROJECT/SLOT   persistent builds directories
    <root>/package-cache/SUITE-ARCH     packages shared by image builds
    /run/nspawn-runner/MACHINE.json     what prepare left for run and cleanup
    /run/nspawn-runner.config/HASH      the config stage's kept output (executor/config.py)

The state root and every directory the driver makes below it are 0700: caches and checkouts of
one project are no business of local users (docs/security.md).

The run stage's share, as plain strings, is in runtime.py (imported there without pathlib)
and re-exported here: RUNTIME_DIR is the same directory as a Path."""

from __future__ import annotations

import os
from pathlib import Path

from nspawn_runner import runtime
from nspawn_runner.runtime import GITLAB_RUNNER_INSIDE as GITLAB_RUNNER_INSIDE
from nspawn_runner.runtime import RESULTS_INSIDE as RESULTS_INSIDE
from nspawn_runner.runtime import RESULTS_TMPFS as RESULTS_TMPFS
from nspawn_runner.runtime import SHELLS as SHELLS

DEFAULT_CONFIG = Path(runtime.DEFAULT_CONFIG)
DEFAULT_ROOT = Path("/var/lib/nspawn-runner")
DEFAULT_IMAGES_CONFIG_DIR = Path("/etc/nspawn-runner/images")
RUNTIME_DIR = Path(runtime.RUNTIME_DIR)


def images_dir(root: Path) -> Path:
    return root / "images"


def overlays_dir(root: Path) -> Path:
    return root / "overlays"


def overlay_dir(root: Path, machine: str) -> Path:
    return overlays_dir(root) / machine


def cache_root(root: Path) -> Path:
    return root / "cache"


def builds_root(root: Path) -> Path:
    return root / "builds"


def package_cache(root: Path) -> Path:
    return root / "package-cache"


def config_cache() -> Path:
    """Where the config stage keeps its output (executor/config.py, runtime.py)."""
    return Path(runtime.config_cache())


def private_dirs(root: Path, *paths: Path) -> None:
    """Make the state root and `paths` below it, every missing component mode 0700; take
    access for others away from a root an older version made 0755 (a group an admin gave it
    stays)."""
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        mode = os.stat(root).st_mode & 0o777
        if mode & 0o007:
            os.chmod(root, mode & 0o770)
    for path in paths:
        missing = []
        for parent in (path, *path.parents):
            if parent == root or os.path.isdir(parent):
                break
            missing.append(parent)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:  # made by a concurrent prepare
                continue
