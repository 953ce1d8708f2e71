"""Crash recovery: remove what belongs to nspawn-runner but to no running job.

gitlab-runner may be killed, the host may reboot, a prepare or a cleanup may be killed
half-way: then the machine outlives its job. A machine belongs to a running job while its
gitlab-runner lives and the job's directory (the one holding JOB_RESPONSE_FILE, which
gitlab-runner removes after cleanup) exists: `state.alive`. Whatever wrappers sit between
gitlab-runner and the driver do not matter. Everything else older than the grace period goes:
machines and their units, overlay directories, ephemeral snapshots nspawn could not delete,
stray state; and caches and persistent builds directories unused for longer than
cache_max_age / builds_max_age. The grace period protects a prepare that is still booting (it
has a unit but no state file yet). Each item is handled on its own: one that fails is
reported, and the rest still goes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from nspawn_runner import layout, log
from nspawn_runner.errors import NspawnRunnerError
from nspawn_runner.executor import identity, pool, state
from nspawn_runner.host import fs, machine, machined, network
from nspawn_runner.settings import Settings


def _job_units() -> dict[str, float]:
    """Our job machines' units and since when each is in its state."""
    return machine.units_since(f"{identity.UNIT_PREFIX}{identity.MACHINE_PREFIX}*")


@dataclass
class Report:
    """What gc removed (or, with dry_run, would remove), and what it could not."""

    dry_run: bool = False
    removed: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    def do(self, kind: str, what: str, why: str, action: Callable[[], object]) -> None:
        item = {"kind": kind, "item": what, "reason": why}
        if self.dry_run:
            self.removed.append(item)
            return
        try:
            action()
        except (NspawnRunnerError, OSError) as e:
            self.errors.append({**item, "error": str(e)})
            log.error(f"gc: could not remove {kind} {what}: {e}")
            return
        self.removed.append(item)
        log.info(f"gc: removed {kind} {what}: {why}")

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        return [f"{verb} {i['kind']} {i['item']}: {i['reason']}" for i in self.removed]


def _age(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_mtime
    except OSError:
        return 0.0


def _last_use(directory: Path) -> float:
    """The newest mtime of a directory and the files directly in it (a cache archive written
    in place does not change its directory's mtime)."""
    newest = directory.lstat().st_mtime
    with os.scandir(directory) as entries:
        for entry in entries:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def _leaf_dirs(top: Path, depth: int) -> Iterator[Path]:
    """Directories exactly `depth` levels below `top` (cache keys, builds slots)."""
    if depth == 0:
        yield top
        return
    try:
        children = sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return
    for child in children:
        yield from _leaf_dirs(child, depth - 1)


def _teardown(name: str, unit: str, overlay: Path | None, stop_timeout: int,
              state_name: str = "") -> None:
    """Stop machine `name`; its unit's reaper removes what it left (executor/reap.py), and
    the job's state file (`state_name`, when a pool machine served the job) goes too."""
    machine.teardown(name, unit, overlay, stop_timeout)
    state.remove(state_name or name)


def collect(cfg: Settings, grace: float, dry_run: bool = False) -> Report:
    """Remove abandoned resources; the report says what went and what could not."""
    now = time.time()
    report = Report(dry_run=dry_run)
    units = _job_units()
    states: dict[str, state.MachineState | None] = {}
    if layout.RUNTIME_DIR.is_dir():
        for path in sorted(layout.RUNTIME_DIR.glob(f"{identity.MACHINE_PREFIX}*.json")):
            try:
                states[path.stem] = state.read(path.stem)
            except NspawnRunnerError as e:
                states[path.stem] = None
                report.errors.append({"kind": "state file", "item": str(path),
                                      "reason": "unreadable", "error": str(e)})
                log.error(f"gc: {e}")

    for name, st in states.items():
        if st is None or state.alive(st) or _age(Path(state.path(name)), now) < grace:
            continue
        overlay = Path(st.overlay) if st.overlay else None
        # st.machine: a pool machine keeps its own name when it serves a job.
        report.do("machine", name, f"image {st.image}: its job is over (gitlab-runner or the "
                  "job's directory is gone)",
                  partial(_teardown, st.machine, st.unit, overlay, cfg.stop_timeout, name))

    for unit, since in units.items():
        name = unit.removeprefix(identity.UNIT_PREFIX).removesuffix(".service")
        if name in states or not identity.is_machine_name(name) or now - since < grace:
            continue
        report.do("machine", name, f"unit {unit} without a job",
                  partial(_teardown, name, unit, layout.overlay_dir(cfg.root, name),
                          cfg.stop_timeout))

    # Pool machines: their own rules (executor/pool.py), their layers too.
    pool.collect(cfg, grace, report.do)
    live = {u.removeprefix(identity.UNIT_PREFIX).removesuffix(".service") for u in _job_units()}
    live |= pool.known()
    if not dry_run:
        # Leases, networkd files and bridges of machines that are gone (host/network.py).
        try:
            for line in network.collect(live | {n for n in states if os.path.exists(state.path(n))},
                                        grace):
                report.removed.append({"kind": "network", "item": line,
                                       "reason": "no machine uses it"})
                log.info(f"gc: removed {line}")
        except (NspawnRunnerError, OSError) as e:
            report.errors.append({"kind": "network", "item": "job networks",
                                  "reason": "collecting", "error": str(e)})
            log.error(f"gc: could not collect job networks: {e}")
    overlays = layout.overlays_dir(cfg.root)
    for path in sorted(overlays.iterdir()) if overlays.is_dir() else []:
        if (path.name in live or path.name in states or pool.is_pool_name(path.name)
                or _age(path, now) < grace):
            continue
        report.do("overlay", str(path), "no machine uses it", partial(fs.remove_tree, path))

    # nspawn --ephemeral deletes its snapshot when it exits, unless it was killed.
    snapshots = sorted(cfg.images_dir.glob(".#machine.*")) if cfg.images_dir.is_dir() else []
    snapshots = [p for p in snapshots if p.is_dir() and not p.is_symlink()]
    if snapshots:
        in_use = machined.root_directories()
        for path in snapshots:
            if str(path) in in_use or _age(path, now) < grace:
                continue

            def drop(p: Path = path) -> None:
                fs.remove_tree(p)
                (p.parent / f".#{p.name}.lck").unlink(missing_ok=True)

            report.do("snapshot", str(path), "no machine uses it", drop)

    _expire(report, cfg, now)

    from nspawn_runner.images import store

    # Old image versions swapped out by maintenance, once no machine uses them any more.
    if not dry_run:
        try:
            for p in store.prune_old_versions(cfg, state.image_uses()):
                report.removed.append({"kind": "old image version", "item": str(p),
                                       "reason": "no machine uses it"})
                log.info(f"gc: removed old image version {p}")
        except (NspawnRunnerError, OSError) as e:
            report.errors.append({"kind": "old image versions", "item": str(cfg.images_dir),
                                  "reason": "pruning", "error": str(e)})
            log.error(f"gc: could not prune old image versions: {e}")
    if not report.removed and not report.errors:
        log.debug("gc: nothing to remove")
    return report


def _expire(report: Report, cfg: Settings, now: float) -> None:
    """Caches (<root>/cache/SERVER/GROUP.../PROJECT/KEY) and persistent builds slots
    (<root>/builds/SERVER/RUNNER/GROUP.../PROJECT/SLOT) unused for longer than their max age.
    Project paths have any depth, so a directory counts as a cache key when it holds files,
    and as a builds slot by its name (slot-N)."""
    held = {st.builds_slot for st in state.all_states()}
    if cfg.cache_max_age:
        for key in _cache_keys(layout.cache_root(cfg.root)):
            age = now - _last_use(key)
            if age > cfg.cache_max_age:
                report.do("cache", str(key), f"unused for {age / 86400:.0f} days "
                          f"(cache_max_age {cfg.cache_max_age // 86400} days)",
                          partial(fs.remove_tree, key))
    if cfg.builds_max_age:
        for slot in _builds_slots(layout.builds_root(cfg.root)):
            age = now - slot.lstat().st_mtime
            if str(slot) not in held and age > cfg.builds_max_age:
                report.do("builds directory", str(slot), f"unused for {age / 86400:.0f} days "
                          f"(builds_max_age {cfg.builds_max_age // 86400} days)",
                          partial(fs.remove_tree, slot))


def _cache_keys(top: Path) -> Iterator[Path]:
    for directory, _dirs, files in os.walk(top):
        if files:
            yield Path(directory)


def _builds_slots(top: Path) -> Iterator[Path]:
    for directory, dirs, _files in os.walk(top):
        for d in list(dirs):
            if d.startswith("slot-") and d[5:].isdigit():
                yield Path(directory) / d
                dirs.remove(d)  # never into a checkout
