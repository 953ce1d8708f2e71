"""systemd-machined, through `machinectl`.

Not a D-Bus binding: pydbus needs PyGObject, whose import alone cost about 90 ms per stage call
in the test bed, and a `machinectl` call takes 4 ms (`busctl --json=short call ...` took 10 ms).
Stdlib only, like every module on a stage's path."""

from __future__ import annotations

import time

from nspawn_runner import proc
from nspawn_runner.errors import SystemFailure

_FIX = "install systemd-container and check that systemd-machined and the system bus run"


def machines() -> list[str]:
    """The names of the registered machines (machinectl leaves out the host's ".host")."""
    out = proc.run(["machinectl", "list", "--no-legend", "--no-pager"], capture=True,
                   check=False, timeout=30)
    if out.returncode != 0:
        detail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "no error output"
        raise SystemFailure(f"cannot reach systemd-machined (`machinectl list` failed: "
                            f"{detail}); {_FIX}")
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def root_directories() -> set[str]:
    """The root directory of every registered machine (for nspawn --ephemeral: its snapshot)."""
    names = machines()
    if not names:
        return set()
    # A machine that goes away between the two calls is reported on stderr and skipped.
    out = proc.run(["machinectl", "show", "--property=RootDirectory", "--no-pager", *names],
                   capture=True, check=False, timeout=30)
    return {line.partition("=")[2] for line in out.stdout.splitlines()
            if line.startswith("RootDirectory=") and line.partition("=")[2]}


def exists(name: str) -> bool:
    return name in machines()


def wait_gone(name: str, timeout: float) -> None:
    """machined forgets a machine when it sees its unit go, asynchronously: wait until it has,
    so a new machine of the same name (a retried prepare) cannot collide with it."""
    deadline = time.monotonic() + timeout
    while exists(name):
        if time.monotonic() > deadline:
            raise SystemFailure(f"machine {name} is still registered {timeout:.0f}s after it was "
                                f"stopped; check `machinectl status {name}`")
        time.sleep(0.05)
