"""What prepare leaves behind for run and cleanup: one small JSON file per machine in /run
(gone after a reboot, like the machines). JSON and stdlib only: run reads it on its hot path."""

from __future__ import annotations

import json
import os

from nspawn_runner import runtime
from nspawn_runner.errors import SystemFailure
from nspawn_runner.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from nspawn_runner.images.store import Use

SCHEMA = 2


class MachineState(Record):
    """A NamedTuple (record.py), not a dataclass: `run` reads it, and dataclasses cost 5 ms
    to import."""

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
    # The gitlab-runner process that prepared the machine ("pid:starttime") and the job's
    # directory it made (JOB_RESPONSE_FILE's): the job runs while both exist (`alive`).
    owner: str = ""
    job_dir: str = ""
    # The machine's init on the host ("pid:starttime"): run reads each step's exit status
    # through /proc/<pid>/root, never through a host directory the job could write.
    leader: str = ""
    status_dev: int = 0  # st_dev of RESULTS_INSIDE's tmpfs at prepare: a remount is refused
    # Seconds a step may take to start before run reports a hanging systemd-run --machine.
    step_start_timeout: int = 60
    builds_slot: str = ""  # host directory of the persistent builds slot, if any
    # btrfs: the --ephemeral snapshot, which cleanup removes should nspawn fail to (a file
    # the job made immutable).
    snapshot: str = ""
    schema: int = SCHEMA


def path(machine: str) -> str:
    return runtime.state_file(machine)


def _json_files() -> list[str]:
    """The state files' names (and pool records'), sorted; none when the directory is not
    there."""
    try:
        return sorted(n for n in os.listdir(runtime.RUNTIME_DIR)
                      if n.endswith(".json") and not n.startswith("."))
    except OSError:
        return []


def write(state: MachineState, job_machine: str | None = None) -> None:
    """`job_machine`: the job's own machine name, when another machine serves the job (a pool
    machine, executor/pool.py): the file is always named for the job."""
    import tempfile  # not needed by run, which only reads

    os.makedirs(runtime.RUNTIME_DIR, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=runtime.RUNTIME_DIR, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(state._asdict(), f)
    os.replace(tmp, path(job_machine or state.machine))


def read(machine: str) -> MachineState | None:
    try:
        with open(path(machine), "rb") as f:
            data = json.load(f)
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


def all_states() -> list[MachineState]:
    """Every readable state file's contents (an unreadable one is skipped: gc reports it)."""
    found = []
    for name in (n.removesuffix(".json") for n in _json_files()):
        try:
            st = read(name)
        except SystemFailure:
            continue
        if st is not None:
            found.append(st)
    return found


def remove(machine: str) -> None:
    try:
        os.unlink(path(machine))
    except FileNotFoundError:
        return


# Wrappers between gitlab-runner and the driver: the owner is the first ancestor that is none.
_WRAPPERS = {"sudo", "doas", "env", "sh", "bash", "dash", "timeout", "nsenter", "setpriv",
             "runuser", "su", "nice", "ionice", "chrt"}


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(comm, ppid, starttime) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, int(fields[1]), fields[19]


def process_identity(pid: int) -> str:
    """"pid:starttime" of a live process, "" if it is gone: a reused pid has another start."""
    info = _stat(pid)
    return f"{pid}:{info[2]}" if info else ""


def owner_identity(pid: int | None = None) -> str:
    """"pid:starttime" of gitlab-runner: it starts every call in a new process group, so the
    owner is the parent of our process group's leader (a `prepare_exec` wrapper that does not
    exec is that leader), skipping wrappers that start their own group (sudo with use_pty)."""
    if pid is None:
        leader = os.getpgrp()
        info = _stat(leader)
        pid = info[1] if info else os.getppid()
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


def alive(st: MachineState) -> bool:
    """Whether the job `st` belongs to is still running: gitlab-runner lives and the job's
    directory, which it removes after cleanup, is still there. The directory is looked up
    through gitlab-runner's own root, so a PrivateTmp= of its service does not hide it."""
    if st.owner and not owner_alive(st.owner):
        return False
    if not st.job_dir:
        return bool(st.owner)
    pid = st.owner.partition(":")[0]
    where = f"/proc/{pid}/root{st.job_dir}" if st.owner else st.job_dir
    return os.path.isdir(where)


def image_uses() -> list[Use]:
    """The image version each prepared machine booted, from the state files (for the image
    commands and gc: an old version is removed only when no machine uses it)."""
    from nspawn_runner.images.store import Use  # not at the top: `run` never needs it

    found = []
    for name in _json_files():
        try:
            with open(os.path.join(runtime.RUNTIME_DIR, name), "rb") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("image"), str):
            found.append(Use(str(data.get("machine", name.removesuffix(".json"))),
                             data["image"], str(data.get("image_id") or "")))
    return found
