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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nspawn_runner import layout, log, proc
from nspawn_runner.errors import SystemFailure
from nspawn_runner.host import fs
from nspawn_runner.images import names
from nspawn_runner.settings import Settings

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
LOCK_PREFIX = ".lock-"
# Inside every image made here: when and how, for chroot-list and chroot-maintenance.
META_PATH = "etc/nspawn-runner/image.json"
META_SCHEMA = 1
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


def ensure_images_dir(settings: Settings) -> None:
    """Make <root>/images. The state root itself is made only where it is the default: a
    root that does not exist elsewhere is a typo, not a place to fill with images."""
    if not settings.root.is_dir() and settings.root != layout.DEFAULT_ROOT:
        origin = settings.origins.get("root", "default")
        raise SystemFailure(f"the state root {settings.root} (root, from {origin}) does not "
                            f"exist: create it (mkdir -p {settings.root}) or fix root")
    settings.images_dir.mkdir(parents=True, exist_ok=True)


@contextmanager
def lock(settings: Settings, name: str, what: str) -> Iterator[None]:
    """Only one create, login, maintenance, import or removal of image `name` at a time. Jobs
    never take it: they only read the current version. `name` is checked first: an invalid
    name never becomes a lock file."""
    names.validate_name(name)
    ensure_images_dir(settings)
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
    ensure_images_dir(settings)
    path = settings.images_dir / _tmp_name(name)
    if fs.on_btrfs(settings.images_dir):
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
    if fs.is_subvolume(src):
        proc.run(["btrfs", "-q", "subvolume", "snapshot", src, dst])
        return dst
    dst = new_empty(settings, name)
    try:
        proc.run(["cp", "-a", "--reflink=auto", f"{src}/.", f"{dst}/"])
    except BaseException:
        fs.remove_tree(dst)
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


@dataclass(frozen=True)
class Use:
    """A running job's machine and the image version it booted."""

    machine: str
    image: str
    image_id: str  # empty: unknown (a state file of an older driver)


# What is running, from the layer that runs jobs (executor/state.py: image_uses), passed in:
# the image store knows nothing of jobs.
InUse = Callable[[], Sequence[Use]]


def _owner(entry: str, prefix: str) -> str:
    """The image name in `.tmp-NAME@...` or `.old-NAME@...`."""
    return entry[len(prefix):].rpartition("@")[0]


def prune_old_versions(settings: Settings, running: Sequence[Use]) -> list[Path]:
    """Remove old versions no job uses any more, and leftovers of interrupted operations;
    return what was removed. Called after every swap, and by `gc`."""
    try:
        entries = sorted(settings.images_dir.iterdir())
    except OSError:
        return []
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
        fs.remove_tree(path)
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
