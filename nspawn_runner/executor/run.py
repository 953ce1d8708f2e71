"""The run stage: pipe one job script into the job's machine and report its exit status.

The hot path of the driver (called for every stage of every job): stdlib only, no settings
file, no D-Bus. What prepare decided is read from the state file."""

from __future__ import annotations

import contextlib
import os
import subprocess

from nspawn_runner import layout, log, proc
from nspawn_runner.errors import BuildFailure, Cancelled, SystemFailure, cancel_on_signals, finish
from nspawn_runner.executor import identity, state

# How long a cancelled step's processes get between SIGTERM and SIGKILL: gitlab-runner's own
# force-kill comes 10 s after its SIGTERM, and we must be done before that.
STOP_GRACE = 5
_UNIT_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def step_unit(stage: str) -> str:
    """A unit name per call, readable in `systemctl --machine=... list-units`."""
    safe = "".join(c if c in _UNIT_SAFE else "-" for c in stage[:40])
    return f"ci-{safe}-{os.getpid()}.service"


def command(st: state.MachineState, unit: str) -> list[str]:
    """systemd-run reads the script from our stdin; the step's exit status comes back through
    a file, because systemd-run --wait also exits 0 when it loses the machine mid-step (the
    machine stopped, or its D-Bus daemon died) and exits non-zero when it could not start the
    step at all: only the file says what the script itself did."""
    shell = layout.SHELLS[st.shell]
    return [
        "systemd-run",
        "--quiet",
        f"--machine={st.machine}",
        "--pipe",
        "--wait",
        "--collect",
        f"--unit={unit}",
        "--service-type=exec",
        f"--property=TimeoutStopSec={STOP_GRACE}",
        f"--working-directory={st.home}",
        # systemd sets these only for units with User=; jobs expect them (pitfall 5).
        f"--setenv=HOME={st.home}",
        f"--setenv=USER={st.user}",
        f"--setenv=LOGNAME={st.user}",
        f"--setenv=SHELL={shell}",
        *([f"--uid={st.user}"] if st.user != "root" else []),
        "--",
        "/bin/sh",
        "-c",
        f'{shell}; echo $? > "$0"',
        f"{layout.RESULTS_INSIDE}/{unit}.status",
    ]


def _exit_code_file(code: int | None) -> None:
    """BUILD_EXIT_CODE_FILE persists across stages: rewrite it, or remove it on success."""
    path = os.environ.get("BUILD_EXIT_CODE_FILE")
    if not path:
        return
    if code is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        with open(path, "w") as f:
            f.write(str(code))


def _stop(st: state.MachineState, unit: str) -> None:
    proc.run(["systemctl", f"--machine={st.machine}", "stop", unit], check=False,
             timeout=STOP_GRACE + 3)


def run(script: str, stage: str) -> None:
    this = identity.load()
    st = state.read(this.machine)
    if st is None:
        raise SystemFailure(f"machine {this.machine} was not prepared (no "
                            f"{state.path(this.machine)}): configure prepare_exec to call "
                            "`nspawn-runner prepare`")
    for name in st.secret_variables:
        log.add_secret(os.environ.get("CUSTOM_ENV_" + name, ""))
    if st.shell not in layout.SHELLS:
        raise SystemFailure(f"unsupported shell {st.shell!r}; set shell to bash or sh")
    unit = step_unit(stage)
    cancel_on_signals()
    try:
        with open(script, "rb") as f:
            child = proc.spawn(command(st, unit), stdin=f)
            try:
                returncode = child.wait()
            except Cancelled:
                # systemd-run got the same SIGTERM and leaves the unit running: stop it.
                _stop(st, unit)
                try:
                    child.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    child.kill()
                raise
    except OSError as e:
        raise SystemFailure(f"cannot read job script {script}: {e.strerror}") from None
    status = _step_status(st, unit)
    if status is None:
        raise SystemFailure(
            f"stage {stage} in machine {st.machine} ended without an exit status (systemd-run "
            f"exited {returncode}): the machine stopped or crashed, or its D-Bus daemon died; "
            f"see journalctl -u {st.unit}")
    if status == 0:
        _exit_code_file(None)
        return
    _exit_code_file(status)
    raise BuildFailure(status)


def _step_status(st: state.MachineState, unit: str) -> int | None:
    path = layout.results_dir(st.machine) / f"{unit}.status"
    try:
        text = path.read_text()
        path.unlink()
        return int(text)
    except (OSError, ValueError):
        return None


def main(args: list[str]) -> int:
    """`run [--verbose] SCRIPT STAGE`; gitlab-runner puts its run_args first, so the script
    and stage are always the last two arguments."""
    options, positional = args[:-2], args[-2:]
    for opt in options:
        if opt in ("-v", "--verbose"):
            log.set_verbose(True)
        else:
            return finish(SystemFailure(
                f"run: unknown option {opt!r}; usage: nspawn-runner run [--verbose] SCRIPT STAGE"))
    if len(positional) != 2:
        return finish(SystemFailure("run: usage: nspawn-runner run [--verbose] SCRIPT STAGE"))
    try:
        run(*positional)
    except BaseException as e:
        return finish(e)
    return finish(None)
