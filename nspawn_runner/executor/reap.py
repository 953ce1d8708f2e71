"""What a machine leaves on the host, removed by the machine's own unit when it stops.

Every machine's unit runs `python -m nspawn_runner.executor.reap MACHINE` as `ExecStopPost=`.
systemd runs it after systemd-nspawn has exited, however the machine ended (cleanup, gc, a
retried prepare, a crash, `RuntimeMaxSec=`), and before the unit counts as stopped. So the
cleanup stage only asks systemd to stop the unit and returns: removing the writable layer, the
state and status files, and an image version the machine was the last user of, happens after
the job, off its path, and is still guaranteed (gc is the backstop for a host that lost power
or a removal that failed).

What a machine left is found from its records in the runtime directory: the job's state file
(`state.MachineState`: root, overlay, image version) and, for a pool machine, its pool record.
Both are JSON objects naming the machine in "machine"."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from nspawn_runner import layout, log
from nspawn_runner.errors import SystemFailure

_MACHINE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
# Characters that systemd would interpret in an ExecStopPost= line (quotes, escapes,
# specifiers, environment variables, word separators).
_UNSAFE = frozenset(" \t\n\"'\\%$;")


def unsafe(value: str) -> bool:
    """Whether systemd would read more into `value` in an Exec*= line than the word it is."""
    return bool(_UNSAFE & set(value))


def unit_properties(machine: str) -> list[str]:
    """systemd-run options for the unit of `machine`: run the reaper when it stops."""
    python = sys.executable
    for value in (python, machine, os.environ.get("NSPAWN_RUNNER_RUNTIME_DIR", "")):
        if unsafe(value):
            raise SystemFailure(f"{value!r} contains a character systemd would interpret in "
                                "ExecStopPost=; install nspawn-runner under a plain path")
    # "-": a failed removal is logged in the unit's journal and left to gc; it must not turn
    # the unit's stop into a failure.
    props = [f"--property=ExecStopPost=-{python} -m nspawn_runner.executor.reap {machine}"]
    if os.environ.get("NSPAWN_RUNNER_RUNTIME_DIR"):
        props.append("--property=Environment=NSPAWN_RUNNER_RUNTIME_DIR="
                     + os.environ["NSPAWN_RUNNER_RUNTIME_DIR"])
    return props


def _records(machine: str) -> list[tuple[Path, dict[str, object]]]:
    """The state files and pool records that name `machine` (its own file first)."""
    own = layout.RUNTIME_DIR / f"{machine}.json"
    try:
        paths = sorted(layout.RUNTIME_DIR.glob("*.json"), key=lambda p: p != own)
    except OSError:
        return []
    found = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("machine") == machine:
            found.append((path, data))
    return found


def _field(records: list[tuple[Path, dict[str, object]]], key: str) -> str:
    for _, data in records:
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def reap(machine: str, root: Path | None = None) -> list[str]:
    """Remove what `machine` left, once its unit has stopped; return what was removed. `root`:
    the state root to look for a writable layer in when no record names one."""
    records = _records(machine)
    removed = []
    recorded_root = _field(records, "root")
    base = Path(recorded_root) if recorded_root else root
    overlay = _field(records, "overlay") or (
        str(layout.overlay_dir(base, machine)) if base is not None else "")
    # The records first: should the rest fail, gc removes an overlay that no record names.
    # Then the machine's own files: its status directory, a pool machine's ready marker.
    own = [path for path, _ in records] + sorted(layout.RUNTIME_DIR.glob(f"{machine}.*"))
    for path in dict.fromkeys(own):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(str(path))
    from nspawn_runner.host import fs, network

    if overlay and os.path.lexists(overlay):
        fs.remove_tree(Path(overlay))
        removed.append(overlay)
    # btrfs: nspawn deletes its --ephemeral snapshot when it exits, unless the job made that
    # impossible (an immutable file) or nspawn was killed.
    snapshot = _field(records, "snapshot")
    if snapshot and Path(snapshot).name.startswith(".#machine.") and os.path.lexists(snapshot):
        fs.remove_tree(Path(snapshot))
        removed.append(snapshot)
    network.release(machine)
    image, image_id = _field(records, "image"), _field(records, "image_id")
    if recorded_root and image and image_id:
        removed += _prune_if_old(Path(recorded_root), image, image_id)
    return removed


def _prune_if_old(root: Path, image: str, image_id: str) -> list[str]:
    """If the machine ran on a version maintenance has swapped out, it may have been its last
    user: remove the old versions no machine uses any more."""
    current = layout.images_dir(root) / image
    try:
        st = current.stat()
        if f"{st.st_dev}:{st.st_ino}" == image_id:
            return []
    except OSError:
        pass
    import fcntl

    from nspawn_runner.executor import state
    from nspawn_runner.images import store
    from nspawn_runner.settings import Settings

    # One prune at a time: two reapers must not remove the same version at once (a lock on
    # the images directory itself).
    fd = os.open(layout.images_dir(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return [str(p) for p in store.prune_old_versions(Settings(root=root),
                                                         state.image_uses())]
    finally:
        os.close(fd)


# Below this share of free space, prepare waits for the layers of stopping machines to go.
LOW_SPACE = 0.10


def low_on_space(root: Path) -> bool:
    try:
        st = os.statvfs(root)
    except OSError:
        return False  # prepare reports a missing state root itself
    return st.f_blocks > 0 and st.f_bavail / st.f_blocks < LOW_SPACE


def wait_for_space(root: Path, timeout: float) -> None:
    """Never start a job on a nearly full disk that is about to be freed: the layers of
    machines whose cleanup has returned are removed while the next job boots, and btrfs frees a
    deleted snapshot's blocks only at a later commit (measured in the test bed: up to 4 GiB
    behind after 20 short jobs). One statvfs when there is space; otherwise wait, at most
    `timeout` seconds, for stopping machines and then for btrfs to free what they left."""
    if not low_on_space(root):
        return
    import time

    from nspawn_runner import proc
    from nspawn_runner.errors import CommandError
    from nspawn_runner.executor import identity
    from nspawn_runner.host import fs

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            stopping = proc.run(["systemctl", "list-units", "--state=deactivating", "--plain",
                                 "--no-legend", f"{identity.UNIT_PREFIX}*"],
                                capture=True, check=False, timeout=30).stdout.strip()
            if not stopping:
                break
            time.sleep(0.1)
        if low_on_space(root) and fs.on_btrfs(root):
            remaining = max(1.0, deadline - time.monotonic())
            proc.run(["btrfs", "subvolume", "sync", root], check=False, timeout=remaining)
    except CommandError as e:
        log.debug(f"waiting for free space: {e}")
    if low_on_space(root):
        st = os.statvfs(root)
        log.warn(f"the state root {root} has only {st.f_bavail * st.f_frsize >> 20} MiB free; "
                 "run `nspawn-runner gc` and check what uses it (images, cache, builds)")


def main(argv: list[str]) -> int:
    from nspawn_runner.errors import finish

    if len(argv) != 1 or not argv[0] or not set(argv[0]) <= _MACHINE_CHARS:
        return finish(SystemFailure("usage: python -m nspawn_runner.executor.reap MACHINE"))
    try:
        for line in reap(argv[0]):
            log.info(f"nspawn-runner: removed {line}")
    except BaseException as e:
        return finish(e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
