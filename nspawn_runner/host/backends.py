"""How a job's writable root is made from a base image, chosen by the state root's file system.

- btrfs: `--ephemeral`, a snapshot nspawn makes next to the image and deletes when it exits;
  takes no lock on the image, costs about nothing on btrfs.
- overlay: `--overlay=IMAGE:UPPER:/` with the upper directory under <root>/overlays/<machine>,
  removed by cleanup.
- volatile: `--volatile=overlay`, a tmpfs upper layer: nothing on disk, bounded by memory.
The base image is never written by a job in any of them."""

from __future__ import annotations

import enum
from pathlib import Path

from nspawn_runner.host import fs


class Backend(enum.StrEnum):
    BTRFS = "btrfs"
    OVERLAY = "overlay"
    VOLATILE = "volatile"


def choose(setting: str, root: Path) -> Backend:
    if setting != "auto":
        return Backend(setting)
    return Backend.BTRFS if fs.on_btrfs(root) else Backend.OVERLAY


def escape(path: Path | str) -> str:
    """nspawn splits --bind=/--overlay= values at ':' and interprets backslash escapes."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


def nspawn_args(backend: Backend, image: Path, upper: Path | None) -> list[str]:
    if backend is Backend.BTRFS:
        return ["--ephemeral"]
    if backend is Backend.VOLATILE:
        return ["--volatile=overlay"]
    assert upper is not None
    return [f"--overlay={escape(image)}:{escape(upper)}:/"]
