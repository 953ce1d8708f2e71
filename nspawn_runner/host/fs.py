"""Removing trees a job, a bootstrapper or a killed process may have left in any state.

One implementation for image versions, overlays, snapshots and status directories: it unmounts
what is still mounted below the tree, deletes btrfs subvolumes as subvolumes (instant, and `rm`
cannot remove a subvolume's root), clears the immutable and append-only flags a root job can
set (`chattr +i`), and never crosses into another file system."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nspawn_runner import proc

# btrfs gives every subvolume's root directory this inode number.
BTRFS_SUBVOLUME_INO = 256


def filesystem(path: Path) -> str:
    """The file system type of `path` as `stat -f` names it: btrfs, ext2/ext3, tmpfs, ..."""
    return proc.run(["stat", "-f", "-c", "%T", path], capture=True).stdout.strip()


def _mount_type(path: Path) -> str:
    """The type of the mount `path`'s device is mounted as, from /proc/self/mountinfo; "" when
    no mount has that device (a btrfs subvolume other than the mounted one has a device number
    of its own)."""
    try:
        dev = os.stat(path).st_dev
        want = f"{os.major(dev)}:{os.minor(dev)}"
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == want and "-" in fields:
                    return fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        pass
    return ""


def on_btrfs(path: Path) -> bool:
    # mountinfo first: prepare asks on every job, and `stat -f` costs it 5 ms.
    return (_mount_type(path) or filesystem(path)) == "btrfs"


def is_subvolume(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_ino == BTRFS_SUBVOLUME_INO and on_btrfs(path)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file `path` (created 0600) while the block runs."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` in this mount namespace."""
    prefix = os.fspath(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def _nested_subvolumes(top: Path) -> list[Path]:
    """Subvolumes inside `top` (systemd makes /var/lib/machines and the like as subvolumes),
    parents before children. With no mounts left, a change of device is a subvolume."""
    found: list[Path] = []
    stack = [(top, top.stat().st_dev)]
    while stack:
        directory, dev = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                if st.st_dev != dev:
                    found.append(Path(entry.path))
                stack.append((Path(entry.path), st.st_dev))
    return found


def _rm(path: Path) -> bool:
    return proc.run(["rm", "-rf", "--one-file-system", path], check=False).returncode == 0


def remove_tree(path: Path) -> None:
    """Remove `path` whatever is in it; nothing if it does not exist. Raises CommandError
    (naming the command and its error) if something still cannot be removed."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    for point in sorted(mounts_under(path), key=len, reverse=True):
        proc.run(["umount", "--lazy", point])
    btrfs = on_btrfs(path)
    if btrfs:
        for sub in reversed(_nested_subvolumes(path)):
            proc.run(["btrfs", "-q", "subvolume", "delete", sub])
        delete: list[str | Path] = ["btrfs", "-q", "subvolume", "delete", path]
        if (path.stat().st_ino == BTRFS_SUBVOLUME_INO
                and proc.run(delete, check=False).returncode == 0):
            return
    if _rm(path):
        return
    # Only now, since it walks the whole tree: a job made files immutable or append-only.
    # -f: device nodes, FIFOs and sockets have no flags to clear.
    proc.run(["chattr", "-R", "-f", "-i", "-a", path], check=False)
    if btrfs and path.stat().st_ino == BTRFS_SUBVOLUME_INO:
        proc.run(["btrfs", "-q", "subvolume", "delete", path])
        return
    proc.run(["rm", "-rf", "--one-file-system", path])
