"""Image versions on disk: where a new version is made, how it replaces the current one
atomically, and when an old one may go.

A new version is made in `<images>/.tmp-NAME@XXXX` (a btrfs subvolume on btrfs) and swapped
with `<images>/NAME` by renameat2(RENAME_EXCHANGE): a job's prepare always finds a complete
image at that path, old or new. The old version becomes `<images>/.old-NAME@<time>-XXXX` and
is removed once no job's state file says it booted from it (a booted overlay or volatile
machine keeps using the directory it mounted). Names starting with '.' are never images
(names.available, names.resolve). Operations on one image take `<images>/.lock-NAME`."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nspawn_runner import log, proc
from nspawn_runner.errors import SystemFailure
from nspawn_runner.executor import state
from nspawn_runner.host import backends
from nspawn_runner.images import names
from nspawn_runner.settings import Settings

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
LOCK_PREFIX = ".lock-"
# Inside every image made here: when and how, for chroot-list and chroot-maintenance.
META_PATH = "etc/nspawn-runner/image.json"
META_SCHEMA = 1
# btrfs gives every subvolume's root directory this inode number.
_BTRFS_SUBVOLUME_INO = 256
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class ImageBusy(SystemFailure):
    pass


def image_path(settings: Settings, name: str) -> Path:
    names.validate_name(name)
    return settings.images_dir / name


def image_id(path: Path) -> str:
    """What prepare records as the version a machine booted (state.MachineState.image_id)."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}"


def on_btrfs(path: Path) -> bool:
    return backends.filesystem(path) == "btrfs"


def is_subvolume(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_ino == _BTRFS_SUBVOLUME_INO and on_btrfs(path)


@contextmanager
def lock(settings: Settings, name: str, what: str) -> Iterator[None]:
    """Only one create, login, maintenance, import or removal of image `name` at a time. Jobs
    never take it: they only read the current version."""
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    path = settings.images_dir / f"{LOCK_PREFIX}{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ImageBusy(f"image {name!r} is busy: {holder} is working on it; wait until it "
                            "ends and retry") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()})\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _is_locked(settings: Settings, name: str) -> bool:
    path = settings.images_dir / f"{LOCK_PREFIX}{name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _tmp_name(name: str) -> str:
    return f"{TMP_PREFIX}{name}@{secrets.token_hex(4)}"


def new_empty(settings: Settings, name: str) -> Path:
    """An empty directory for a new version of `name`, next to it (same file system, so it
    can be renamed into place): a subvolume on btrfs, so jobs get instant snapshots."""
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    path = settings.images_dir / _tmp_name(name)
    if on_btrfs(settings.images_dir):
        proc.run(["btrfs", "-q", "subvolume", "create", path])
    else:
        path.mkdir(mode=0o755)
    os.chmod(path, 0o755)  # the root of a file system, whatever the umask
    return path


def new_copy(settings: Settings, name: str) -> Path:
    """A writable copy of the current version of `name`: a snapshot on btrfs, else a full copy
    (hard links would let changes write through into the image jobs are using)."""
    src = image_path(settings, name)
    if not src.is_dir():
        raise names.ImageError(f"image {name!r} does not exist in {settings.images_dir}; "
                                "`nspawn-runner chroot-list` shows the images there are")
    dst = settings.images_dir / _tmp_name(name)
    if is_subvolume(src):
        proc.run(["btrfs", "-q", "subvolume", "snapshot", src, dst])
        return dst
    dst = new_empty(settings, name)
    try:
        proc.run(["cp", "-a", "--reflink=auto", f"{src}/.", f"{dst}/"])
    except BaseException:
        remove_tree(dst)
        raise
    return dst


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                      _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_in(settings: Settings, name: str, new: Path) -> Path | None:
    """Make `new` the current version of `name` in one step; return where the old version
    went (None if there was none). Jobs that booted the old one keep it."""
    current = image_path(settings, name)
    old = settings.images_dir / f"{OLD_PREFIX}{name}@{int(time.time())}-{secrets.token_hex(2)}"
    if not os.path.lexists(current):
        os.rename(new, current)
        return None
    try:
        _exchange(new, current)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        # A file system without RENAME_EXCHANGE: for a moment there is no image; a job
        # starting then fails as a system failure, which gitlab-runner retries.
        log.warn(f"{settings.images_dir}: the file system cannot swap directories atomically")
        os.rename(current, old)
        os.rename(new, current)
        return old
    os.rename(new, old)
    return old


def _mounts_under(path: Path) -> list[str]:
    prefix = os.fspath(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """Remove a version (or a leftover): unmount what a killed bootstrapper left mounted
    inside, delete nested subvolumes, then the tree itself, never crossing into another file
    system."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        proc.run(["umount", "--lazy", point])
    btrfs = on_btrfs(path)
    if btrfs:
        for sub in reversed(_nested_subvolumes(path)):
            proc.run(["btrfs", "-q", "subvolume", "delete", sub])
    if btrfs and path.stat().st_ino == _BTRFS_SUBVOLUME_INO:
        proc.run(["btrfs", "-q", "subvolume", "delete", path])
    else:
        proc.run(["rm", "-rf", "--one-file-system", path])


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


@dataclass(frozen=True)
class Use:
    """A running job's machine and the image version it booted."""

    machine: str
    image: str
    image_id: str  # empty: unknown (a state file of an older driver)


def uses() -> list[Use]:
    """The machines prepare set up, from their state files."""
    found = []
    try:
        paths = sorted(state.RUNTIME_DIR.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("image"), str):
            found.append(Use(str(data.get("machine", path.stem)), data["image"],
                             str(data.get("image_id") or "")))
    return found


def jobs_using(name: str) -> list[str]:
    return [u.machine for u in uses() if u.image == name]


def _owner(entry: str, prefix: str) -> str:
    """The image name in `.tmp-NAME@...` or `.old-NAME@...`."""
    return entry[len(prefix):].rpartition("@")[0]


def prune_old_versions(settings: Settings) -> list[Path]:
    """Remove old versions no job uses any more, and leftovers of interrupted operations;
    return what was removed. Called after every swap, and by `gc`."""
    try:
        entries = sorted(settings.images_dir.iterdir())
    except OSError:
        return []
    running = uses()
    removed = []
    for path in entries:
        entry = path.name
        if entry.startswith(OLD_PREFIX):
            name = _owner(entry, OLD_PREFIX)
            try:
                version = image_id(path)
            except OSError:
                continue
            if any(u.image == name and u.image_id in (version, "") for u in running):
                log.debug(f"{path}: kept, jobs still use this version of {name!r}")
                continue
        elif entry.startswith(TMP_PREFIX):
            # A create, login or maintenance in progress holds the image's lock.
            if _is_locked(settings, _owner(entry, TMP_PREFIX)):
                continue
        else:
            continue
        remove_tree(path)
        removed.append(path)
        log.debug(f"removed {path}")
    return removed


def read_meta(path: Path) -> dict[str, object]:
    try:
        data = json.loads((path / META_PATH).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_meta(path: Path, **values: object) -> None:
    """Record facts about the version in `path` (merged with what is there)."""
    data = read_meta(path)
    data.update(values, schema=META_SCHEMA)
    target = path / META_PATH
    # Written as root into a tree whose links point wherever its packages say: never follow.
    for parent in (path / "etc", target.parent):
        if parent.is_symlink():
            raise SystemFailure(f"{parent} in the image is a symlink; refusing to follow it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, target)


def size(path: Path) -> int | None:
    result = proc.run(["du", "-s", "-x", "--block-size=1", path], capture=True, check=False)
    try:
        return int(result.stdout.split()[0])
    except (IndexError, ValueError):
        return None
