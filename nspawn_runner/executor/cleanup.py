"""The cleanup stage: stop the job's machine and remove its writable layer. gitlab-runner calls
it after every job and after every failed config or prepare attempt: idempotent."""

from __future__ import annotations

import signal
from pathlib import Path

from nspawn_runner import layout, log
from nspawn_runner.executor import identity, state
from nspawn_runner.host import fs, machine, network
from nspawn_runner.settings import Settings


def cleanup(cfg: Settings) -> None:
    # gitlab-runner sends SIGTERM to our process group at cleanup_exec_timeout: finish the
    # teardown rather than leave half a machine (the ignored signal is inherited by systemctl
    # and rm, which would die of it too). SIGKILL still ends us; gc then collects the rest.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    this = identity.load(secret_names=cfg.secret_variables)
    saved = state.read(this.machine)
    # The settings may have changed since prepare; the state file knows what prepare did.
    root = Path(saved.root) if saved else cfg.root
    overlay = Path(saved.overlay) if saved and saved.overlay else layout.overlay_dir(
        root, this.machine)
    machine.teardown(this.machine, this.unit, overlay, cfg.stop_timeout)
    if saved and saved.snapshot and Path(saved.snapshot).name.startswith(".#machine."):
        fs.remove_tree(Path(saved.snapshot))
    network.release(this.machine)
    state.remove(this.machine)
    log.debug(f"machine {this.machine} removed")
    if saved and saved.image_id:
        from nspawn_runner.images import store

        # This may have been the last job on a version maintenance swapped out: drop it now
        # rather than at the next image command. Never fail a cleanup over it.
        try:
            for path in store.prune_old_versions(Settings(root=root), state.image_uses()):
                log.debug(f"removed old image version {path}")
        except Exception as e:
            log.warn(f"could not remove old image versions: {e}")
