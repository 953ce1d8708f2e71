"""What prepare leaves behind for run and cleanup: one small JSON file per machine in /run
(gone after a reboot, like the machines). JSON and stdlib only: run reads it on its hot path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from nspawn_runner import layout
from nspawn_runner.errors import SystemFailure

if TYPE_CHECKING:
    from nspawn_runner.images.store import Use

SCHEMA = 1


class MachineState(NamedTuple):
    """A NamedTuple, not a dataclass: `run` reads it, and dataclasses cost 5 ms to import."""

    machine: str
    unit: str
    image: str
    backend: str
    root: str
    overlay: str | None  # directory that cleanup removes, if any
    shell: str = "bash"
    user: str = "root"
    home: str = "/root"
    secret_variables: tuple[str, ...] = ()
    # Which version of the image the machine booted (st_dev:st_ino of its directory), so that
    # an old version swapped out by maintenance is removed only when no machine uses it.
    image_path: str = ""
    image_id: str = ""
    # The gitlab-runner process that prepared the machine ("pid:starttime"): `gc` treats the
    # machine as abandoned once it is gone.
    owner: str = ""
    schema: int = SCHEMA


def path(machine: str) -> Path:
    return layout.state_file(machine)


def write(state: MachineState) -> None:
    import tempfile  # not needed by run, which only reads

    layout.RUNTIME_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=layout.RUNTIME_DIR, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(state._asdict(), f)
    os.replace(tmp, path(state.machine))


def read(machine: str) -> MachineState | None:
    try:
        data = json.loads(path(machine).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SystemFailure(f"state file {path(machine)} is unreadable ({e}); "
                            "remove it and retry the job") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise SystemFailure(f"state file {path(machine)} has an unknown format; it was written "
                            "by another nspawn-runner version: retry the job")
    data["secret_variables"] = tuple(data.get("secret_variables", ()))
    try:
        return MachineState(**data)
    except TypeError as e:
        raise SystemFailure(f"state file {path(machine)} does not fit this nspawn-runner "
                            f"version ({e}): retry the job") from None


def remove(machine: str) -> None:
    import shutil

    shutil.rmtree(layout.results_dir(machine), ignore_errors=True)
    path(machine).unlink(missing_ok=True)


# Wrappers between gitlab-runner and the driver: the owner is the first ancestor that is none.
_WRAPPERS = {"sudo", "doas", "env", "sh", "bash", "dash", "timeout", "nsenter", "setpriv",
             "runuser", "su", "nice", "ionice", "chrt"}


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(comm, ppid, starttime) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, int(fields[1]), fields[19]


def owner_identity(pid: int | None = None) -> str:
    """"pid:starttime" of the process that called us through any wrappers (gitlab-runner)."""
    pid = os.getppid() if pid is None else pid
    while pid > 1:
        info = _stat(pid)
        if info is None:
            break
        comm, ppid, start = info
        if comm not in _WRAPPERS:
            return f"{pid}:{start}"
        pid = ppid
    return ""


def owner_alive(identity: str) -> bool:
    """Whether the process `owner_identity` named still runs (a reused pid does not count)."""
    if not identity:
        return False
    pid, _, start = identity.partition(":")
    info = _stat(int(pid))
    return info is not None and info[2] == start


def image_uses() -> list[Use]:
    """The image version each prepared machine booted, from the state files (for the image
    commands and gc: an old version is removed only when no machine uses it)."""
    from nspawn_runner.images.store import Use  # not at the top: `run` never needs it

    found = []
    try:
        paths = sorted(layout.RUNTIME_DIR.glob("*.json"))
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
