"""Every path the driver uses: under the state root, under /run, and inside a job's machine.

One place, so that prepare, run, cleanup, gc, the image commands and check agree on them, and
a reader sees the whole tree at once:

    <root>/images/NAME                  image versions (images/store.py)
    <root>/overlays/MACHINE/upper       a job's writable layer on the overlay backend
    <root>/cache/SERVER/GROUP/PROJECT   caches, bound at <cache_dir>/GROUP/PROJECT
    <root>/builds/SERVER/GROUP/PROJECT/SLOT   persistent builds directories
    <root>/package-cache/SUITE-ARCH     packages shared by image builds
    /run/nspawn-runner/MACHINE.json     what prepare left for run and cleanup
    /run/nspawn-runner/MACHINE.d        bound into the machine at RESULTS_INSIDE

Imported on the `run` hot path: stdlib only, nothing but os and pathlib."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/nspawn-runner/config.toml")
DEFAULT_ROOT = Path("/var/lib/nspawn-runner")
DEFAULT_IMAGES_CONFIG_DIR = Path("/etc/nspawn-runner/images")
RUNTIME_DIR = Path(os.environ.get("NSPAWN_RUNNER_RUNTIME_DIR", "/run/nspawn-runner"))

# Inside every machine.
RESULTS_INSIDE = "/run/nspawn-runner"  # where each step leaves its exit status
GITLAB_RUNNER_INSIDE = "/usr/local/bin/gitlab-runner"
SHELLS = {"bash": "/bin/bash", "sh": "/bin/sh"}  # the `shell` setting: the path inside


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


def state_file(machine: str) -> Path:
    return RUNTIME_DIR / f"{machine}.json"


def results_dir(machine: str) -> Path:
    """Host side of RESULTS_INSIDE for `machine`."""
    return RUNTIME_DIR / f"{machine}.d"
