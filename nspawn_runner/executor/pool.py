"""The warm pool: machines booted ahead of their job, so that prepare hands one out instead of
booting (`pool_size` in the settings or an image file; 0, the default, means no pool).

machined cannot rename a machine, so a pool machine boots under a neutral name, `nrp-<random>`,
in its own unit `nspawn-runner-nrp-<random>.service`, and the job's state file (named for the
job's machine, as always) says which machine and unit serve the job: run and cleanup read the
machine and unit from it. The other way, renaming, would need a new registration with machined,
which only nspawn's start can make. Each pool machine serves one job and is then destroyed like
any job's machine; its machine-id, boot and writable layer are its own and new.

What a job's own machine would get at boot and a pool machine cannot know yet is done at hand-out:
- the job's cache directory (and with persistent_builds its builds slot) is bound with
  `machinectl bind --mkdir` (machined moves a bind mount into the running machine);
- the job's network is the pool machine's own zone, attached when it booted; the hand-out
  waits, like prepare, until the job's first command can use it;
- the host name is set to the job's machine name if the image has no /etc/hostname (nspawn
  names the host after the machine, and the guest keeps that when the image names none);
- `RuntimeMaxSec=` (max_job_duration) cannot be changed on a running unit (systemd 252:
  "Cannot set property RuntimeMaxUSec"), so a timer unit, PartOf= the machine's unit, stops
  the machine that long after the hand-out;
- the build user is created and given its directories, as after a boot.
A pool machine is handed out only to a job whose machine would be booted exactly the same way
(image, version, backend, limits, isolation options, binds fixed at boot: `key`), and never
when `private_users` is on (machined refuses binds into a user namespace).

Files: `<runtime dir>/nrp-X.json` (the record: which image version, which key, whose runner,
its network zone), `nrp-X.ready` (made by the unit's ExecStartPost= once the guest is up;
taking a machine is removing it, which only one prepare can do). The unit's ExecStopPost=
(executor/reap.py) removes them, the machine's layer and its network."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

from nspawn_runner import layout, log, proc, settings
from nspawn_runner.errors import SystemFailure
from nspawn_runner.executor import identity, reap, state, status
from nspawn_runner.host import backends, machine, netplan, network
from nspawn_runner.host.limits import Limits
from nspawn_runner.settings import Settings

PREFIX = "nrp-"
SCHEMA = 1
# Properties of a job's unit that a pool machine's unit gets otherwise, or not at all.
_RUNTIME_MAX = "--property=RuntimeMaxSec="
_CPU_WEIGHT = "--property=CPUWeight="
# While it waits, a pool machine (its boot above all) gets the CPU only when no job wants it:
# a replacement booting beside a job slowed the job's steps by a third (bench/, 2 cores).
IDLE_CPU_WEIGHT = 1
_PER_MACHINE = ("--property=ExecStopPost=", "--property=Environment=NSPAWN_RUNNER_RUNTIME_DIR=")


class PoolMachine(NamedTuple):
    machine: str
    unit: str
    image: str
    image_path: str
    image_id: str  # the image version it booted (st_dev:st_ino), as in a job's state
    backend: str
    root: str
    overlay: str | None
    key: str  # how it was booted: a job gets it only if its own machine would be the same
    owner: str  # the gitlab-runner process it is kept for ("pid:starttime")
    booted: float  # time.time() of its start
    zone: str = ""  # its network zone (host/network.py), "" with network = host or none
    ipv6: bool = False
    # The settings file whose pool_size it was booted for: only jobs of that file refill the
    # pool or shrink it, so that a runner with pool_size 0 whose machines would be booted the
    # same way (same key) does not stop another runner's pool.
    settings: str = ""
    kind: str = "pool"
    schema: int = SCHEMA


def is_pool_name(name: str) -> bool:
    rest = name.removeprefix(PREFIX)
    return name.startswith(PREFIX) and len(rest) == 8 and set(rest) <= set("0123456789abcdef")


def unit_of(name: str) -> str:
    return f"{identity.UNIT_PREFIX}{name}.service"


def deadline_unit(name: str) -> str:
    return f"{identity.UNIT_PREFIX}deadline-{name}"


def size(cfg: Settings, image: str, lim: Limits) -> int:
    """How many machines of `image` to keep booted ahead: the image file's pool_size, else the
    settings'. 0 when a pool cannot serve these jobs (private_users)."""
    if lim.private_users:
        return 0
    from nspawn_runner.images import spec

    image_spec = spec.load(cfg, image)
    if image_spec is not None and image_spec.pool_size is not None:
        return image_spec.pool_size
    return cfg.pool_size


def _pool_properties(spec: machine.BootSpec) -> list[str]:
    return [p for p in spec.properties
            if not p.startswith(_RUNTIME_MAX) and not p.startswith(_PER_MACHINE)]


def key(spec: machine.BootSpec) -> str:
    """What must be equal for a pool machine to serve a job: everything fixed at boot except
    the names and the job's own binds (bound at hand-out)."""
    fixed = [spec.image, str(spec.image_path), spec.backend.value, str(spec.root),
             spec.boot_timeout, spec.stop_timeout,
             [[str(host), inside] for host, inside in spec.binds_ro], _pool_properties(spec),
             list(spec.nspawn_options), spec.idmap, spec.personality, list(spec.init_args)]
    return hashlib.sha256(json.dumps(fixed).encode()).hexdigest()[:16]


def _image_id(path: str | Path) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def exists() -> bool:
    """Whether any pool machine has a record (one glob: prepare asks on every job)."""
    return any(layout.RUNTIME_DIR.glob(f"{PREFIX}*.json"))


def records() -> list[PoolMachine]:
    """Every pool machine's record, oldest first."""
    found = []
    for path in sorted(layout.RUNTIME_DIR.glob(f"{PREFIX}*.json")):
        try:
            data = json.loads(path.read_text())
            found.append(PoolMachine(**data))
        except (OSError, ValueError, TypeError):
            continue  # being written or removed, or another version's: gc decides
    return sorted(found, key=lambda r: r.booted)


def _write(record: PoolMachine) -> None:
    layout.RUNTIME_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = layout.RUNTIME_DIR / f".tmp-{record.machine}.json"
    tmp.write_text(json.dumps(record._asdict()))
    os.replace(tmp, layout.RUNTIME_DIR / f"{record.machine}.json")


def _ready(name: str) -> Path:
    return layout.RUNTIME_DIR / f"{name}.ready"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One refill or hand-out at a time: two prepares must not both boot the machine the pool
    lacks, and a refill must not rewrite the record of a machine being handed out."""
    layout.RUNTIME_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The directory itself: a lock file would be one more file there to account for.
    fd = os.open(layout.RUNTIME_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def take(cfg: Settings, spec: machine.BootSpec, lim: Limits, saved: state.MachineState,
         user_dirs: Sequence[str]) -> bool:
    """Hand a ready pool machine to the job `saved` describes: write the job's state naming it
    and give it what the job's own machine would have got at boot. False when there is none
    (the caller boots one); a machine that fails its hand-out is destroyed."""
    wanted, current = key(spec), _image_id(spec.image_path)
    for record in records():
        if record.key != wanted:
            continue
        if record.image_id != current:
            # Booted before maintenance swapped the image: never handed out; replaced.
            log.debug(f"pool machine {record.machine} runs an old version of {record.image}")
            _discard(record.machine, record.unit)
            continue
        with _locked():
            try:
                _ready(record.machine).unlink()
            except FileNotFoundError:
                continue  # still booting, or another prepare took it
            mine = saved._replace(machine=record.machine, unit=record.unit,
                                  overlay=record.overlay, image_id=record.image_id)
            state.write(mine, saved.machine)
            # From now on the machine is the job's, as a booted one would be.
            (layout.RUNTIME_DIR / f"{record.machine}.json").unlink(missing_ok=True)
        try:
            _hand_out(spec, lim, saved, mine, user_dirs, record)
        except (SystemFailure, OSError) as e:
            log.info(f"nspawn-runner: pool machine {record.machine} could not be handed out "
                     f"({e}); booting one")
            # The job's state first, back to the machine prepare boots instead: the pool
            # machine's reaper removes the records that name it.
            state.write(saved)
            _discard(record.machine, record.unit)
            return False
        log.info(f"nspawn-runner: machine {record.machine} from the warm pool of image "
                 f"{spec.image!r} ({spec.backend} backend), booted "
                 f"{time.time() - record.booted:.0f}s ago")
        return True
    return False


def _discard(name: str, unit: str) -> None:
    """Stop a pool machine no job has used, without waiting: its guest killed at once
    (host/machine.py: kill_guest says why not a stop alone), the unit stopped."""
    machine.kill_guest(name, unit)
    machine.request_stop(unit)


def release(job_machine: str, stop_timeout: int) -> None:
    """Stop the pool machine an earlier attempt of this job was handed, if any: only the job's
    state file names it."""
    try:
        old = state.read(job_machine)
    except SystemFailure:
        return  # unreadable: prepare replaces it, gc removes what it named
    if old is not None and old.machine != job_machine and is_pool_name(old.machine):
        machine.teardown(old.machine, old.unit, Path(old.overlay) if old.overlay else None,
                         stop_timeout)


def _hand_out(spec: machine.BootSpec, lim: Limits, saved: state.MachineState,
              mine: state.MachineState, user_dirs: Sequence[str], record: PoolMachine) -> None:
    name = mine.machine
    leader, root_dir = machine.describe(name)
    mine = mine._replace(leader=leader, status_dev=status.device(leader),
                         snapshot=root_dir if spec.backend is backends.Backend.BTRFS else "")
    if not mine.status_dev:
        raise SystemFailure(f"pool machine {name}: its {layout.RESULTS_INSIDE} cannot be read "
                            "from the host")
    state.write(mine, saved.machine)
    # The job's CPU weight, or systemd's default (an empty value unsets it), as at its boot.
    weight = next((p.removeprefix(_CPU_WEIGHT) for p in spec.properties
                   if p.startswith(_CPU_WEIGHT)), "")
    proc.run(["systemctl", "set-property", "--runtime", mine.unit, f"CPUWeight={weight}"],
             timeout=30)
    for host, inside in spec.binds:
        # prepare made them (private to root), as for a machine it boots.
        host.mkdir(parents=True, exist_ok=True)
        proc.run(["machinectl", "bind", "--mkdir", name, host, inside], timeout=60)
    network.wait_usable(name, network.Attached(zone=record.zone, ipv6=record.ipv6), spec.image,
                        partial(status.has, mine.leader, mine.status_dev,
                                netplan.READY_MARK))
    hostname = spec.image_path / "etc" / "hostname"
    try:
        named = hostname.is_file() and bool(hostname.read_text().strip())
    except OSError:
        named = False
    if not named:
        proc.run(["nsenter", f"--target={leader.partition(':')[0]}", "--uts", "hostname",
                  saved.machine], timeout=30)
    for prop in spec.properties:
        if prop.startswith(_RUNTIME_MAX):
            proc.run(["systemd-run", "--quiet", "--collect", f"--unit={deadline_unit(name)}",
                      f"--on-active={prop.removeprefix(_RUNTIME_MAX)}",
                      f"--timer-property=PartOf={mine.unit}",
                      f"--description=nspawn-runner: max_job_duration of {saved.machine}",
                      "--", "systemctl", "stop", "--no-block", mine.unit], timeout=30)
    if lim.user != "root":
        home = machine.ensure_user(name, lim.user, list(user_dirs))
        state.write(mine._replace(user=lim.user, home=home), saved.machine)


def _boot(cfg: Settings, spec: machine.BootSpec, lim: Limits, owner: str) -> str:
    """Start a pool machine like `spec`'s, without waiting for it (systemd-run --no-block:
    the boot runs on in PID 1, not in this process)."""
    name = PREFIX + os.urandom(4).hex()
    unit = unit_of(name)
    touch = shutil.which("touch") or "/usr/bin/touch"
    ready = str(_ready(name))
    for value in (touch, ready):
        if reap.unsafe(value):
            raise SystemFailure(f"{value!r} contains a character systemd would interpret; "
                                "set NSPAWN_RUNNER_RUNTIME_DIR to a plain path")
    record = PoolMachine(
        machine=name, unit=unit, image=spec.image, image_path=str(spec.image_path),
        image_id=_image_id(spec.image_path), backend=spec.backend.value, root=str(spec.root),
        overlay=str(layout.overlay_dir(spec.root, name))
        if spec.backend is backends.Backend.OVERLAY else None,
        key=key(spec), owner=owner, booted=time.time(), settings=_settings_file())
    _write(record)  # before the boot: gc knows whose it is even if we are killed now
    try:
        net = network.attach(name, cfg.network_options(lim.network))
        record = record._replace(zone=net.zone, ipv6=net.ipv6)
        _write(record)
        pool_spec = dataclasses.replace(
            spec, machine=name, unit=unit,
            description=f"nspawn-runner pool machine for image {spec.image}",
            binds=(),  # the job's, bound at hand-out
            nspawn_options=spec.nspawn_options + net.nspawn_options,
            properties=(*(p for p in _pool_properties(spec) if not p.startswith(_CPU_WEIGHT)),
                        f"{_CPU_WEIGHT}{IDLE_CPU_WEIGHT}", *reap.unit_properties(name),
                        # After READY=1: up, and may be handed out.
                        f"--property=ExecStartPost={touch} {ready}"))
        if pool_spec.overlay:
            layout.private_dirs(spec.root, layout.overlays_dir(spec.root))
            (pool_spec.overlay / "upper").mkdir(parents=True)
        cmd = machine.boot_command(pool_spec)
        cmd.insert(1, "--no-block")  # systemd-run --no-block: queue the start, do not wait
        proc.run(cmd, timeout=60)
    except BaseException:
        reap.reap(name)
        raise
    log.debug(f"pool machine {name} for image {spec.image} booting")
    return name


def _settings_file() -> str:
    return str(settings.config_path())


def refill(cfg: Settings, spec: machine.BootSpec, lim: Limits, wanted: int,
           owner: str) -> list[str]:
    """Boot what the pool of `spec`'s kind lacks, in the background; stop what it has too
    many of. Machines kept for a runner that is gone are taken over for `owner`. Never fails
    the job: a pool that cannot be filled is a warning."""
    booted = []
    try:
        with _locked():
            mine = _settings_file()
            same = [r for r in records() if r.key == key(spec) and r.settings == mine
                    and r.image_id == _image_id(spec.image_path)]
            for extra in same[wanted:]:
                if _ready(extra.machine).exists():
                    _discard(extra.machine, extra.unit)
            for record in same[:wanted]:
                if record.owner != owner and not state.owner_alive(record.owner):
                    _write(record._replace(owner=owner))
            for _ in range(wanted - len(same)):
                booted.append(_boot(cfg, spec, lim, owner))
    except (SystemFailure, OSError) as e:
        log.warn(f"could not refill the warm pool of image {spec.image!r}: {e}")
    return booted


def template_job(image: str) -> identity.Job:
    """A job for `prepare.boot_spec` to make a pool machine's spec from, without a real job:
    its names and project only go into the parts a pool machine gets at hand-out."""
    return identity.Job(job_id="0", server="", runner_id="", project_path="pool",
                        image_ref=image)


SpecOf = Callable[[str], "tuple[machine.BootSpec, Limits]"]


def fill(cfg: Settings, spec_of: SpecOf, owner: str, images: Sequence[str]) -> list[str]:
    """Refill the pool of every image in `images` whose pool_size is not 0 (the pool service
    after a boot, and after an image command replaced a version)."""
    booted = []
    for image in images:
        try:
            spec, lim = spec_of(image)
        except SystemFailure as e:
            log.warn(f"no warm pool for image {image!r}: {e}")
            continue
        wanted = size(cfg, spec.image, lim)
        if wanted:
            booted += refill(cfg, spec, lim, wanted, owner)
    return booted


def recycle(cfg: Settings, spec_of: SpecOf) -> list[str]:
    """After an image command: stop the pool machines that run a version their image no longer
    has, and boot their replacements for the runner they were kept for. Returns the machines
    booted."""
    stale: dict[str, str] = {}
    for record in records():
        if record.image_id != _image_id(Path(record.root) / "images" / record.image):
            _discard(record.machine, record.unit)
            if state.owner_alive(record.owner):
                stale.setdefault(record.image, record.owner)
    booted = []
    for image, owner in stale.items():
        booted += fill(cfg, spec_of, owner, [image])
    return booted


def known() -> set[str]:
    """Pool machines with a record or a unit (gc keeps their networks and layers)."""
    names = {r.machine for r in records()}
    for unit in machine.units_since(f"{identity.UNIT_PREFIX}{PREFIX}*"):
        name = unit.removeprefix(identity.UNIT_PREFIX).removesuffix(".service")
        if is_pool_name(name):
            names.add(name)
    return names


def _serving() -> set[str]:
    """Pool machines that serve a job now (a job's state file names them)."""
    found = set()
    for path in layout.RUNTIME_DIR.glob(f"{identity.MACHINE_PREFIX}*.json"):
        try:
            name = json.loads(path.read_text()).get("machine", "")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str) and is_pool_name(name):
            found.add(name)
    return found


# gc's Report.do(kind, item, reason, action): runs the action (or, dry, only notes it) and
# reports what went and what failed.
Do = Callable[[str, str, str, Callable[[], object]], None]


def _remove(cfg: Settings, name: str, unit: str, overlay: str | None) -> None:
    _discard(name, unit)
    machine.teardown(name, unit, Path(overlay) if overlay else None, cfg.stop_timeout)
    reap.reap(name, root=cfg.root)


def collect(cfg: Settings, grace: float, do: Do) -> None:
    """gc: remove pool machines kept for a runner that is gone, of an old image version, or
    left without record or unit. A pool machine serving a job is the job's: gc's rules for
    jobs apply to it."""
    now = time.time()
    units = machine.units_since(f"{identity.UNIT_PREFIX}{PREFIX}*")
    serving = _serving()
    recorded = set()
    for record in records():
        recorded.add(record.machine)
        if record.machine in serving:
            continue
        why = ""
        if record.image_id != _image_id(Path(record.root) / "images" / record.image):
            why = "it runs an old version of its image"
        elif now - record.booted < grace:
            continue
        elif not state.owner_alive(record.owner):
            why = "the gitlab-runner process it was kept for is gone"
        elif record.unit not in units:
            why = "its unit is gone"
        if why:
            do("pool machine", record.machine, f"image {record.image}: {why}",
               partial(_remove, cfg, record.machine, record.unit, record.overlay))
    for unit, since in units.items():
        name = unit.removeprefix(identity.UNIT_PREFIX).removesuffix(".service")
        if (is_pool_name(name) and name not in recorded and name not in serving
                and now - since >= grace):
            do("pool machine", name, f"unit {unit} without a record",
               partial(_remove, cfg, name, unit, None))
    # Files and layers of pool machines that have neither record nor unit any more.
    left = {p.name.partition(".")[0]: p for p in layout.RUNTIME_DIR.glob(f"{PREFIX}*")}
    overlays = layout.overlays_dir(cfg.root)
    left |= {p.name: p for p in (overlays.iterdir() if overlays.is_dir() else [])}
    for name, path in sorted(left.items()):
        if (is_pool_name(name) and name not in recorded and name not in serving
                and unit_of(name) not in units and now - path.lstat().st_mtime >= grace):
            do("pool leftovers", name, "no pool machine has them",
               partial(reap.reap, name, cfg.root))


def drain(cfg: Settings) -> list[str]:
    """Stop every pool machine that serves no job (`nspawn-runner pool drain`), with or
    without a record."""
    serving = _serving()
    idle: dict[str, PoolMachine | None] = {r.machine: r for r in records()
                                           if r.machine not in serving}
    for unit in machine.units_since(f"{identity.UNIT_PREFIX}{PREFIX}*"):
        name = unit.removeprefix(identity.UNIT_PREFIX).removesuffix(".service")
        if is_pool_name(name) and name not in serving:
            idle.setdefault(name, None)
    stopped = []
    for name, record in sorted(idle.items()):
        _remove(cfg, name, unit_of(name), record.overlay if record else None)
        stopped.append(name)
    return stopped


def runner_of_unit(unit: str) -> str:
    """The owner identity of the main process of `unit` (gitlab-runner.service for the pool
    service, whose own parent is systemd)."""
    pid = proc.run(["systemctl", "show", "--property=MainPID", "--value", unit], capture=True,
                   check=False).stdout.strip()
    if not pid.isdigit() or pid == "0":
        raise SystemFailure(f"{unit} is not running, so a warm pool would be kept for no "
                            f"runner; start it first (the example unit runs After= it)")
    return state.owner_identity(int(pid))


def listing() -> list[dict[str, object]]:
    """`nspawn-runner pool list`."""
    serving = _serving()
    return [{"machine": r.machine, "image": r.image,
             "state": "serving" if r.machine in serving else
             "ready" if _ready(r.machine).exists() else "booting",
             "age": round(time.time() - r.booted), "runner_alive": state.owner_alive(r.owner),
             "current_version": r.image_id == _image_id(Path(r.root) / "images" / r.image)}
            for r in records()]

