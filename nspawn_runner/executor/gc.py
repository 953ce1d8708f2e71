"""Crash recovery: remove what belongs to nspawn-runner but to no running job.

gitlab-runner may be killed, the host may reboot, a prepare may be cancelled half-way: then
cleanup never runs. A machine belongs to a running job while the gitlab-runner process that
prepared it lives (recorded in its state file as pid and start time, so a reused pid does not
count). Everything else older than the grace period goes: machines and their units, overlay
directories, ephemeral snapshots nspawn could not delete, stray state. The grace period
protects a prepare that is still booting (it has a unit but no state file yet)."""

from __future__ import annotations

import time
from pathlib import Path

from nspawn_runner import layout, log, proc
from nspawn_runner.executor import identity, state
from nspawn_runner.host import fs, machine, machined, network
from nspawn_runner.settings import Settings


def _units() -> dict[str, float]:
    """Our machine units and when each became active (seconds since the epoch)."""
    listed = proc.run(["systemctl", "list-units", "--all", "--plain", "--no-legend", "--full",
                       f"{identity.UNIT_PREFIX}{identity.MACHINE_PREFIX}*"],
                      capture=True, check=False)
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    if not names:
        return {}
    shown = proc.run(["systemctl", "show", "--timestamp=unix",
                      "--property=Id,StateChangeTimestamp", *names], capture=True, check=False)
    out: dict[str, float] = {}
    unit = ""
    for line in shown.stdout.splitlines():
        key, _, value = line.partition("=")
        if key == "Id":
            unit = value
        elif key == "StateChangeTimestamp" and unit:
            out[unit] = float(value.lstrip("@") or 0)
    return out


def _age(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_mtime
    except OSError:
        return 0.0


def collect(cfg: Settings, grace: float) -> list[str]:
    """Remove abandoned resources; return one line per thing removed."""
    now = time.time()
    removed: list[str] = []
    units = _units()
    states: dict[str, state.MachineState | None] = {}
    if layout.RUNTIME_DIR.is_dir():
        for path in layout.RUNTIME_DIR.glob(f"{identity.MACHINE_PREFIX}*.json"):
            states[path.stem] = state.read(path.stem)

    for name, st in states.items():
        if st is None or state.owner_alive(st.owner) or _age(state.path(name), now) < grace:
            continue
        overlay = Path(st.overlay) if st.overlay else None
        machine.teardown(name, st.unit, overlay, cfg.stop_timeout)
        state.remove(name)
        removed.append(f"machine {name} (image {st.image}): its gitlab-runner process is gone")

    for unit, since in units.items():
        name = unit.removeprefix(identity.UNIT_PREFIX).removesuffix(".service")
        if name in states or not identity.is_machine_name(name) or now - since < grace:
            continue
        machine.teardown(name, unit, layout.overlay_dir(cfg.root, name), cfg.stop_timeout)
        state.remove(name)
        removed.append(f"machine {name}: unit {unit} without a job")

    live = {u.removeprefix(identity.UNIT_PREFIX).removesuffix(".service") for u in _units()}
    removed += network.collect(live | {n for n in states if state.path(n).exists()}, grace)
    overlays = layout.overlays_dir(cfg.root)
    for path in sorted(overlays.iterdir()) if overlays.is_dir() else []:
        if path.name in live or path.name in states or _age(path, now) < grace:
            continue
        fs.remove_tree(path)
        removed.append(f"overlay {path}")

    if layout.RUNTIME_DIR.is_dir():
        for path in layout.RUNTIME_DIR.glob(f"{identity.MACHINE_PREFIX}*.d"):
            name = path.name.removesuffix(".d")
            if name not in live and not state.path(name).exists() and _age(path, now) >= grace:
                fs.remove_tree(path)
                removed.append(f"status directory {path}")

    # nspawn --ephemeral deletes its snapshot when it exits, unless it was killed.
    snapshots = sorted(cfg.images_dir.glob(".#machine.*")) if cfg.images_dir.is_dir() else []
    snapshots = [p for p in snapshots if p.is_dir() and not p.is_symlink()]
    if snapshots:
        in_use = machined.root_directories()
        for path in snapshots:
            if str(path) in in_use or _age(path, now) < grace:
                continue
            fs.remove_tree(path)
            lock = path.parent / f".#{path.name}.lck"
            lock.unlink(missing_ok=True)
            removed.append(f"snapshot {path}")
    from nspawn_runner.images import store

    # Old image versions swapped out by maintenance, once no machine uses them any more.
    removed += [f"old image version {p}" for p in store.prune_old_versions(cfg, state.image_uses())]
    for line in removed:
        log.info(f"gc: removed {line}")
    if not removed:
        log.debug("gc: nothing to remove")
    return removed

