"""The run stage: pipe one job script into the job's machine and report its exit status.

The hot path of the driver (called for every stage of every job): stdlib only, no settings
file, no D-Bus. What prepare decided is read from the state file."""

from __future__ import annotations

import os

from nspawn_runner import log, proc, runtime
from nspawn_runner.errors import (
    BuildFailure,
    Cancelled,
    CommandError,
    SystemFailure,
    cancel_on_signals,
    finish,
)
from nspawn_runner.executor import identity, state, status

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
    a file in the machine (status.py), because systemd-run --wait also exits 0 when it loses
    the machine mid-step (the machine stopped, or its D-Bus daemon died) and exits non-zero
    when it could not start the step at all: only the file says what the script itself did.
    A second file says the step started, so that a hanging systemd-run is noticed."""
    shell = runtime.SHELLS[st.shell]
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
        f': > "$0.started"; {shell}; echo $? > "$0.status"',
        f"{runtime.RESULTS_INSIDE}/{unit}",
    ]


def _exit_code_file(code: int | None) -> None:
    """BUILD_EXIT_CODE_FILE persists across stages: rewrite it, or remove it on success."""
    path = os.environ.get("BUILD_EXIT_CODE_FILE")
    if not path:
        return
    if code is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
    else:
        with open(path, "w") as f:
            f.write(str(code))


def _stop(st: state.MachineState, unit: str, child: proc.Child) -> None:
    """Stop a cancelled step: systemd-run got the same SIGTERM and leaves the unit running.
    If the machine's bus does not answer, kill the step's processes from the host."""
    try:
        stopped = proc.run(["systemctl", f"--machine={st.machine}", "stop", unit],
                           check=False, timeout=STOP_GRACE + 3).returncode in (0, 5)
    except CommandError:  # timed out: the bus hangs
        stopped = False
    if not stopped:
        killed = _kill_from_host(st, unit)
        log.warn(f"could not stop {unit} in machine {st.machine} through its bus; killed "
                 f"{killed} of its processes from the host")
    try:
        child.wait(timeout=2)
    except proc.Timeout:
        child.kill()
        child.wait()


def _step_cgroups(st: state.MachineState, unit: str) -> list[str]:
    """The step unit's cgroup directories on the host, found from the machine's init."""
    pid = st.leader.partition(":")[0]
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers not in ("", "name=systemd") or not path.endswith("/init.scope"):
            continue
        payload = path.removesuffix("/init.scope")
        bases = (["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] if controllers == ""
                 else ["/sys/fs/cgroup/systemd"])
        found += [d for d in (f"{b}{payload}/system.slice/{unit}" for b in bases)
                  if os.path.isdir(d)]
    return found


def _kill_from_host(st: state.MachineState, unit: str) -> int:
    import signal
    import time

    killed = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        pids = set()
        for group in _step_cgroups(st, unit):
            try:
                with open(f"{group}/cgroup.procs") as f:
                    pids |= {int(p) for p in f.read().split()}
            except OSError:
                continue
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                continue
        time.sleep(0.05)
    return killed


def _wait(child: proc.Child, st: state.MachineState, unit: str, stage: str) -> int:
    """Wait for systemd-run; notice within step_start_timeout when the step never starts
    (systemd-run --machine hangs on a broken bus), and when systemd-run hangs on after the
    step ended."""
    import time

    started = False
    deadline = time.monotonic() + st.step_start_timeout
    delay = 0.01
    ended_at = 0.0
    while True:
        code = child.poll(delay)
        if code is not None:
            return code
        fd = status.open_dir(st.leader, st.status_dev)
        if fd is None:
            continue  # the machine is gone: systemd-run notices too, and returns
        try:
            if not started:
                started = status.exists(fd, unit + ".started")
            ended = status.exists(fd, unit + ".status")
        finally:
            os.close(fd)
        now = time.monotonic()
        if ended:
            if ended_at and now - ended_at > 5:
                log.warn(f"systemd-run hung after stage {stage} ended; stopped it")
                child.kill()
                return child.wait()
            ended_at = ended_at or now
        if started:
            delay = 5.0
        elif now > deadline:
            child.kill()
            child.wait()
            raise SystemFailure(
                f"stage {stage} did not start in machine {st.machine} within "
                f"{st.step_start_timeout}s: `systemd-run --machine={st.machine}` hangs, "
                "so the machine's systemd or D-Bus does not answer (a known systemd failure "
                "after packages change /usr/share/dbus-1/system.d); see journalctl -u "
                f"{st.unit}, and `machinectl shell {st.machine}`; raise "
                "step_start_timeout if the host is only overloaded")
        else:
            delay = min(delay * 2, 0.5)


def run(script: str, stage: str) -> None:
    this = identity.load()
    st = state.read(this.machine)
    if st is None:
        raise SystemFailure(f"machine {this.machine} was not prepared (no "
                            f"{state.path(this.machine)}): configure prepare_exec to call "
                            "`nspawn-runner prepare`")
    for name in st.secret_variables:
        log.add_secret(os.environ.get("CUSTOM_ENV_" + name, ""))
    if st.shell not in runtime.SHELLS:
        raise SystemFailure(f"unsupported shell {st.shell!r}; set shell to bash or sh")
    unit = step_unit(stage)
    cancel_on_signals()
    try:
        f = open(script, "rb")  # closed below, after the step
    except OSError as e:
        raise SystemFailure(f"cannot read job script {script}: {e.strerror}") from None
    with f:
        child = proc.start(command(st, unit), stdin=f.fileno())
        try:
            returncode = _wait(child, st, unit, stage)
        except Cancelled:
            _stop(st, unit, child)
            raise
    code = _step_status(st, unit)
    if code is None:
        raise SystemFailure(
            f"stage {stage} in machine {st.machine} ended without an exit status (systemd-run "
            f"exited {returncode}): the machine stopped or crashed, its D-Bus daemon died, or "
            f"the job replaced {runtime.RESULTS_INSIDE}; see journalctl -u {st.unit}")
    if code == 0:
        _exit_code_file(None)
        return
    _exit_code_file(code)
    raise BuildFailure(code)


def _step_status(st: state.MachineState, unit: str) -> int | None:
    fd = status.open_dir(st.leader, st.status_dev)
    if fd is None:
        return None
    try:
        code = status.parse_status(status.read_small(fd, unit + ".status"))
        status.remove(fd, unit + ".status", unit + ".started")
        return code
    finally:
        os.close(fd)


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
