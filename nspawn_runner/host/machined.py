"""systemd-machined over D-Bus (pydbus). Imported only where machines are queried, never on the
`run` stage's success path: pydbus pulls in GObject introspection."""

from __future__ import annotations

import time
from typing import Any

from nspawn_runner.errors import SystemFailure

_machined: Any = None


def _manager() -> Any:
    global _machined
    if _machined is None:
        try:
            from pydbus import SystemBus

            _machined = SystemBus().get("org.freedesktop.machine1")
        except Exception as e:  # GLib.Error, ImportError: both mean "cannot talk to machined"
            raise SystemFailure(
                f"cannot reach systemd-machined over D-Bus ({e}); install systemd-container "
                "and python3-gi/pydbus, and check that the system bus runs") from None
    return _machined


def machines() -> list[str]:
    try:
        return [str(m[0]) for m in _manager().ListMachines()]
    except SystemFailure:
        raise
    except Exception as e:
        raise SystemFailure(f"listing machines over D-Bus failed: {e}") from None


def root_directories() -> set[str]:
    """The root directory of every registered machine (for nspawn --ephemeral: its snapshot)."""
    out = set()
    try:
        from pydbus import SystemBus

        bus = SystemBus()
        for _name, _cls, _service, path in _manager().ListMachines():
            root = bus.get("org.freedesktop.machine1", path).RootDirectory
            if root:
                out.add(str(root))
    except SystemFailure:
        raise
    except Exception as e:
        raise SystemFailure(f"reading machines over D-Bus failed: {e}") from None
    return out


def exists(name: str) -> bool:
    return name in machines()


def wait_gone(name: str, timeout: float) -> None:
    """`systemctl stop` and `machinectl terminate` return before machined forgets the machine;
    wait until it does, so a new job of the same name cannot collide with it."""
    deadline = time.monotonic() + timeout
    while exists(name):
        if time.monotonic() > deadline:
            raise SystemFailure(f"machine {name} is still registered {timeout:.0f}s after it was "
                                f"stopped; check `machinectl status {name}`")
        time.sleep(0.05)
