"""The life of a job's machine: boot it from an image through systemd-run, tear it down."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from nspawn_runner import layout, log, proc
from nspawn_runner.errors import CommandError, SystemFailure
from nspawn_runner.host import backends, fs, machined
from nspawn_runner.host.backends import Backend

DEVICE_ALLOW = ("/dev/net/tun rwm", "char-pts rw")


@dataclass(frozen=True)
class BootSpec:
    machine: str
    unit: str
    image: str
    image_path: Path
    backend: Backend
    root: Path
    boot_timeout: int
    stop_timeout: int
    binds: tuple[tuple[Path, str], ...] = ()  # (host path, path inside), read-write
    binds_ro: tuple[tuple[Path, str], ...] = ()
    description: str = ""
    properties: tuple[str, ...] = ()  # --property= for the machine's unit (limits)
    nspawn_options: tuple[str, ...] = ()  # isolation options, already validated
    # With a private user namespace, binds from the host are idmapped so that host root's
    # files are root's inside.
    idmap: bool = False
    personality: str = ""  # e.g. x86 for an i386 image on x86-64, so uname -m says i686
    # For the guest's init (systemd.mask=...): always the last words of the command line.
    init_args: tuple[str, ...] = ()

    @property
    def overlay(self) -> Path | None:
        if self.backend is Backend.OVERLAY:
            return layout.overlay_dir(self.root, self.machine)
        return None


def boot_command(spec: BootSpec) -> list[str]:
    upper = spec.overlay / "upper" if spec.overlay else None
    opts = ":idmap" if spec.idmap else ""
    return [
        "systemd-run",
        "--quiet",
        f"--unit={spec.unit}",
        "--collect",
        f"--description={spec.description or 'nspawn-runner machine ' + spec.machine}",
        "--property=Type=notify",
        "--property=Slice=machine.slice",
        "--property=Delegate=yes",
        "--property=KillMode=mixed",
        f"--property=TimeoutStartSec={spec.boot_timeout}",
        f"--property=TimeoutStopSec={spec.stop_timeout}",
        # With --keep-unit nspawn adds no device rules of its own (pitfall 14): those of
        # systemd-nspawn@.service (the standard pseudo devices come with "closed"), so that a
        # job's CAP_MKNOD opens no host disk.
        "--property=DevicePolicy=closed",
        *[f"--property=DeviceAllow={rule}" for rule in DEVICE_ALLOW],
        *spec.properties,
        "--",
        "systemd-nspawn",
        "--quiet",
        "--keep-unit",
        "--boot",
        "--notify-ready=yes",
        f"--machine={spec.machine}",
        f"--directory={spec.image_path}",
        *backends.nspawn_args(spec.backend, spec.image_path, upper),
        *([f"--personality={spec.personality}"] if spec.personality else []),
        # Ignore .nspawn files next to the image: a job's machine is defined here, not there.
        "--settings=no",
        "--link-journal=no",
        "--console=read-only",
        # Where each step's exit status goes (executor/status.py): the machine's own tmpfs.
        f"--tmpfs={backends.escape(layout.RESULTS_INSIDE)}:{layout.RESULTS_TMPFS}",
        *[f"--bind={backends.escape(h)}:{backends.escape(i)}{opts}" for h, i in spec.binds],
        *[f"--bind-ro={backends.escape(h)}:{backends.escape(i)}{opts}"
          for h, i in spec.binds_ro],
        *spec.nspawn_options,
        # After every option: nspawn passes the first non-option and what follows to init.
        *spec.init_args,
    ]


def _journal_tail(unit: str, lines: int = 15) -> str:
    out = proc.run(["journalctl", "--no-pager", "-o", "cat", "-n", str(lines), "-u", unit],
                   check=False, capture=True)
    return out.stdout.strip()


def _reason(journal: str, unit: str) -> str:
    """The last thing nspawn or the guest said, not systemd's own lines about the unit."""
    lines = [line for line in journal.splitlines() if unit not in line and line.strip()]
    return lines[-1].strip() if lines else ""


def boot(spec: BootSpec) -> None:
    """Start the machine; return once its init reported ready. On any failure, including
    cancellation, nothing is left behind."""
    start = time.monotonic()
    try:
        if spec.overlay:
            (spec.overlay / "upper").mkdir(parents=True)
        for host, _ in spec.binds:
            host.mkdir(parents=True, exist_ok=True)
        proc.run(boot_command(spec), timeout=spec.boot_timeout + 30)
    except CommandError as e:
        tail = _journal_tail(spec.unit)
        if tail:
            log.info(f"last messages of {spec.unit}:\n{tail}")
        teardown(spec.machine, spec.unit, spec.overlay, spec.stop_timeout, discard=True)
        timed_out = "result 'timeout'" in tail or "timeout" in e.stderr.lower()
        if timed_out or e.returncode == 124:
            raise SystemFailure(
                f"machine {spec.machine} did not boot within {spec.boot_timeout}s "
                f"(boot_timeout); check that image {spec.image!r} boots: "
                f"systemd-nspawn -D {spec.image_path} --boot") from None
        raise SystemFailure(f"machine {spec.machine} failed to boot from image {spec.image!r}: "
                            f"{_reason(tail, spec.unit) or e}") from None
    except BaseException:
        # Cancelled while booting: a guest in its first moments would not see a poweroff.
        teardown(spec.machine, spec.unit, spec.overlay, spec.stop_timeout, discard=True)
        raise
    log.debug(f"machine {spec.machine} ready in {time.monotonic() - start:.2f}s")


def describe(machine: str) -> tuple[str, str]:
    """("pid:starttime" of the machine's init as the host sees it, its root directory)."""
    out = proc.run(["machinectl", "show", "--property=Leader", "--property=RootDirectory",
                    machine], capture=True).stdout
    props = dict(line.partition("=")[::2] for line in out.splitlines())
    pid = props.get("Leader", "")
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        raise SystemFailure(f"machine {machine} has no running init (machined says leader "
                            f"{pid!r}); see journalctl -u nspawn-runner-{machine}.service"
                            ) from None
    return f"{pid}:{start}", props.get("RootDirectory", "")


def ensure_user(machine: str, user: str, dirs: list[str]) -> str:
    """Create `user` in the machine if the image lacks it, give it `dirs`, return its home."""
    script = ('id -u "$1" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$1"; '
              'u=$1; shift; mkdir -p "$@" && chown "$u:" "$@" && getent passwd "$u" | cut -d: -f6')
    out = proc.run(["systemd-run", "--quiet", f"--machine={machine}", "--wait", "--pipe",
                    "--", "/bin/sh", "-c", script, "sh", user, *dirs], capture=True)
    home = out.stdout.strip()
    if not home.startswith("/"):
        raise SystemFailure(f"cannot find the home of user {user!r} in machine {machine}; "
                            "check that the image has useradd (package passwd)")
    return home


def kill_guest(machine: str, unit: str) -> None:
    """End a machine that nothing in it needs to shut down for (its boot failed or was
    cancelled, or no job ever used it) at once: SIGKILL to the guest's init. nspawn then cleans
    up and exits, and the unit stops with its ExecStopPost=. Not a stop alone: nspawn asks the
    guest to power off with one SIGRTMIN+3, which a guest still in its first moments of boot
    has no handler for yet and never sees (measured: the stop then waits for TimeoutStopSec and
    kills nspawn, which leaves its btrfs snapshot behind). Waits up to 2 s for nspawn to
    register a machine whose unit is still starting."""
    for _ in range(20):
        killed = proc.run(["machinectl", "kill", "--kill-who=leader", "--signal=SIGKILL", machine],
                          check=False, timeout=30)
        if killed.returncode == 0:
            return
        active = proc.run(["systemctl", "is-active", unit], capture=True, check=False,
                          timeout=30).stdout.strip()
        if active != "activating":
            return  # gone already, or stopping
        time.sleep(0.1)  # nspawn has not registered the machine yet


_TRANSIENT = Path("/run/systemd/transient")


def _maybe_loaded(unit: str) -> bool:
    """Whether systemd may have `unit` loaded. The driver's units are all transient, and
    systemd keeps a transient unit's file in /run/systemd/transient while it is loaded: looking
    there spares prepare a `systemctl stop` (9 ms) for the leftover that is almost never
    there. Where that directory does not exist, systemctl is asked."""
    if not _TRANSIENT.is_dir():
        return True
    return os.path.lexists(_TRANSIENT / unit)


def teardown(machine: str, unit: str, overlay: Path | None, stop_timeout: int,
             discard: bool = False) -> None:
    """Stop the machine and remove its writable layer. Safe to call for a machine that does not
    exist or is half made, and twice in a row. `discard`: the machine is thrown away before any
    job step ran (a failed or cancelled prepare): its guest is killed first (`kill_guest`)."""
    if not discard and not _maybe_loaded(unit):
        if overlay is not None and overlay.exists():
            fs.remove_tree(overlay)
        return
    if discard:
        kill_guest(machine, unit)
    # `systemctl stop` waits for the stop job: nspawn has powered the guest off, unmounted the
    # overlay and removed an ephemeral snapshot when it returns.
    result = proc.run(["systemctl", "stop", unit], check=False,
                      timeout=stop_timeout + 30)
    # 5: unit not loaded, i.e. already gone.
    if result.returncode not in (0, 5):
        raise CommandError(["systemctl", "stop", unit], result.returncode, result.stderr)
    if result.returncode == 0:
        # Only a unit that was there can leave a failed state or a registration behind.
        proc.run(["systemctl", "reset-failed", unit], check=False)
        machined.wait_gone(machine, timeout=10)
    if overlay is not None and overlay.exists():
        fs.remove_tree(overlay)


def request_stop(unit: str) -> bool:
    """Ask systemd to stop `unit` and return at once (`--no-block`): the stop job runs on in
    PID 1 whatever happens to us, with the unit's ExecStopPost= at its end. False if there is
    no such unit."""
    result = proc.run(["systemctl", "stop", "--no-block", unit], check=False, timeout=30)
    # 5: unit not loaded, i.e. already gone.
    if result.returncode not in (0, 5):
        raise CommandError(["systemctl", "stop", "--no-block", unit], result.returncode,
                           result.stderr)
    return result.returncode == 0


def units_since(pattern: str) -> dict[str, float]:
    """The units matching `pattern` (also those stopping or failed) and since when each is in
    its state (seconds since the epoch): gc and the pool judge their age by it."""
    listed = proc.run(["systemctl", "list-units", "--all", "--plain", "--no-legend", "--full",
                       pattern], capture=True, check=False)
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
