"""Files the host reads inside a job's machine, where the job is root.

Each step leaves its exit status in RESULTS_INSIDE, a small tmpfs of the machine's own (nspawn
--tmpfs), never in a host directory: a job cannot fill a host file system through it, nor point
the host at a host file. The host opens the files through the machine's root
(/proc/<init>/root) one path component at a time, without following symbolic links, without
blocking on FIFOs, only regular files on the very tmpfs prepare saw, and reads a few bytes at
most: a job that plants a link to /dev/zero, a FIFO or another file only spoils its own exit
status (pitfall 16). Imported on the `run` hot path: os and stat only."""

from __future__ import annotations

import os
import stat

from nspawn_runner import runtime

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
MAX_STATUS = 16  # "255\n" and then some


def _start_time(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode()
    except OSError:
        return ""
    return text[text.rindex(")") + 2:].split()[19]


def open_dir(leader: str, status_dev: int = 0,
             inside: str = runtime.RESULTS_INSIDE) -> int | None:
    """A directory fd of RESULTS_INSIDE in the machine whose init is `leader`
    ("pid:starttime"), None when the machine is gone or the directory was tampered with
    (a link, or another file system than the tmpfs of `status_dev`)."""
    pid, _, start = leader.partition(":")
    if not pid.isdigit():
        return None
    try:
        root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # Checked after the open: had the pid been reused before it, the start differs now.
        if _start_time(pid) != start:
            return None
        fd = root
        for part in inside.strip("/").split("/"):
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                if fd != root:
                    os.close(fd)
                return None
            if fd != root:
                os.close(fd)
            fd = nxt
        if status_dev and os.fstat(fd).st_dev != status_dev:
            os.close(fd)
            return None
        return fd
    finally:
        os.close(root)


def device(leader: str) -> int:
    """st_dev of RESULTS_INSIDE now (prepare records it), 0 if it cannot be opened."""
    fd = open_dir(leader)
    if fd is None:
        return 0
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def has(leader: str, status_dev: int, name: str) -> bool:
    """Whether a file `name` is in the machine's RESULTS_INSIDE (a mark a unit of the machine
    leaves, such as its network's being ready)."""
    fd = open_dir(leader, status_dev)
    if fd is None:
        return False
    try:
        return exists(fd, name)
    finally:
        os.close(fd)


def read_small(dir_fd: int, name: str, limit: int = MAX_STATUS) -> bytes | None:
    """At most `limit` bytes of regular file `name`; None for anything else (missing, a link,
    a FIFO, a device, a directory, or larger than `limit`)."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        return os.read(fd, limit + 1)[:limit]
    except OSError:
        return None
    finally:
        os.close(fd)


def parse_status(data: bytes | None) -> int | None:
    """The exit status the step's shell wrote ("0".."255"), None for anything else."""
    if data is None:
        return None
    text = data.strip()
    if not text.isdigit() or len(text) > 3:
        return None
    value = int(text)
    return value if value <= 255 else None


def remove(dir_fd: int, *names: str) -> None:
    for name in names:
        try:
            os.unlink(name, dir_fd=dir_fd)  # removes a link itself, never its target
        except OSError:
            continue
