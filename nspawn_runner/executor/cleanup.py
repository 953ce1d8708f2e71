"""The cleanup stage: stop the job's machine. gitlab-runner calls it after every job and after
every failed config or prepare attempt: idempotent.

It returns once systemd has the machine's stop job: the guest powers off, and the unit's
ExecStopPost= (executor/reap.py) removes its writable layer, state and status files and an
image version it was the last user of, after the job and off its path."""

from __future__ import annotations

import signal

from nspawn_runner import log
from nspawn_runner.executor import identity, reap, state
from nspawn_runner.host import machine
from nspawn_runner.settings import Settings


def cleanup(cfg: Settings) -> None:
    # gitlab-runner sends SIGTERM to our process group at cleanup_exec_timeout: finish the
    # teardown rather than leave half a machine (the ignored signal is inherited by systemctl
    # and rm, which would die of it too). SIGKILL still ends us; gc then collects the rest.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    this = identity.load(secret_names=cfg.secret_variables)
    saved = state.read(this.machine)
    # A pool machine serves the job under its own name: the state file says which.
    name, unit = (saved.machine, saved.unit) if saved else (this.machine, this.unit)
    if machine.request_stop(unit):
        log.debug(f"machine {name} stopping; its unit removes what it leaves")
        return
    # No unit (a failed prepare, a second cleanup, a machine that crashed): nothing will
    # remove what is left but us.
    for line in reap.reap(name, root=cfg.root):
        log.debug(f"removed {line}")
    if name != this.machine:
        state.remove(this.machine)
