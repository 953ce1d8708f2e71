"""The prepare stage: boot the job's machine from its image, return once it is up.

See docs/architecture.md for the lifecycle and ../shared/custom-executor-protocol.md for the
contract; config.py, run.py and cleanup.py are the other stages."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from functools import partial
from pathlib import Path

from nspawn_runner import layout, log, settings
from nspawn_runner.errors import SystemFailure
from nspawn_runner.executor import identity, pool, reap, state, status
from nspawn_runner.host import backends, fs, limits, machine, netplan, network
from nspawn_runner.images import names
from nspawn_runner.settings import Settings

_SERVER = re.compile(r"^[A-Za-z0-9.:-]+$")


def _server_dir(this: identity.Job) -> str:
    return this.server if _SERVER.match(this.server) and ".." not in this.server else "local"


def cache_host_dir(cfg: Settings, this: identity.Job) -> Path:
    # Per GitLab instance and project: a job only ever sees its own project's caches.
    return layout.cache_root(cfg.root) / _server_dir(this) / this.project_path


def builds_base(cfg: Settings, this: identity.Job) -> Path:
    """The persistent builds directories of the job's runner and project: one per concurrent
    slot below it. Keyed by the runner too, so that two runner entries on one host never share
    a checkout."""
    runner = this.runner_id if this.runner_id.isdigit() else "unknown"
    return layout.builds_root(cfg.root) / _server_dir(this) / runner / this.project_path


def claim_builds_slot(cfg: Settings, this: identity.Job) -> Path:
    """The lowest slot no running job holds. Chosen by the driver, never by the job
    (CI_CONCURRENT_ID is a job variable): a job cannot make another job's checkout its own.
    Call with the lock of `builds_base` held, and record the slot before releasing it."""
    base = builds_base(cfg, this)
    held = set()
    for other in state.all_states():
        if other.machine != this.machine and other.builds_slot and state.alive(other):
            held.add(other.builds_slot)
    slot = 0
    while str(base / f"slot-{slot}") in held:
        slot += 1
    path = base / f"slot-{slot}"
    layout.private_dirs(cfg.root, path)
    os.utime(path)  # gc expires slots by their last use
    return path


def gitlab_runner_binary(cfg: Settings) -> Path | None:
    if cfg.gitlab_runner:
        path = Path(cfg.gitlab_runner)
        if not path.is_file():
            raise SystemFailure(
                f"gitlab_runner = {cfg.gitlab_runner!r} in {settings.config_path()} is not a "
                "file; fix the path or leave it empty to search PATH")
        return path.resolve()
    found = shutil.which("gitlab-runner")
    return Path(found).resolve() if found else None


def _check_host() -> None:
    if not os.path.isdir("/run/systemd/system"):
        raise SystemFailure("this host is not running systemd as PID 1, which nspawn-runner "
                            "needs to boot machines; run it on a systemd host (see docs/testing.md "
                            "for the test bed on hosts without it)")


def boot_spec(cfg: Settings, this: identity.Job, default_image: str = "",
              builds_slot: Path | None = None) -> tuple[machine.BootSpec, limits.Limits]:
    """How to boot the job's machine, and the limits that apply to it (the settings',
    overridden by the image file's [limits]). Nothing here comes from job variables but the
    image's name."""
    from nspawn_runner.images import spec

    name, path = names.resolve(cfg, this.image_ref, default_image)
    backend = backends.choose(cfg.backend, cfg.root)
    image_spec = spec.load(cfg, name)
    lim = cfg.limits(**(image_spec.limit_overrides() if image_spec else {}))
    if lim.private_users and backend is not backends.Backend.BTRFS:
        # nspawn maps ownership with idmapped mounts, which it cannot do on an overlay root;
        # chowning would copy the whole image into the job's layer.
        raise SystemFailure(f"private_users needs the btrfs backend, not {backend}: put the "
                            "state root on btrfs or set private_users = false")
    binds_ro: list[tuple[Path, str]] = []
    runner = gitlab_runner_binary(cfg)
    if runner is not None:
        binds_ro.append((runner, layout.GITLAB_RUNNER_INSIDE))
    else:
        log.info("nspawn-runner: gitlab-runner was not found on this host, so caches and "
                 "artifacts are skipped inside the job; install it or set gitlab_runner in "
                 f"{settings.config_path()}")
    return machine.BootSpec(
        personality=image_spec.personality if image_spec else "",
        machine=this.machine,
        unit=this.unit,
        image=name,
        image_path=path,
        backend=backend,
        root=cfg.root,
        boot_timeout=cfg.boot_timeout,
        stop_timeout=cfg.stop_timeout,
        binds=(
            (cache_host_dir(cfg, this), f"{cfg.cache_dir}/{this.project_path}"),
            *([(builds_slot, cfg.builds_dir)] if builds_slot else []),
        ),
        binds_ro=tuple(binds_ro),
        description=f"nspawn-runner job {this.job_id} on image {name}",
        # Removal of what the machine leaves, whoever stops it (executor/reap.py).
        properties=(*lim.unit_properties(runtime_max(lim, this)),
                    *reap.unit_properties(this.machine)),
        idmap=lim.private_users,
        nspawn_options=tuple(lim.nspawn_args()),
        init_args=tuple(lim.init_args()),
    ), lim


# After the job's own timeout: after_script, cache and artifact uploads, cleanup.
TIMEOUT_MARGIN = 900


def runtime_max(lim: limits.Limits, this: identity.Job) -> int:
    """RuntimeMaxSec= of the machine's unit: the backstop that stops a machine whose job is
    long over even if cleanup and gc never ran. The job's timeout plus a margin, capped by the
    admin's max_job_duration."""
    by_job = this.timeout + TIMEOUT_MARGIN if this.timeout else 0
    caps = [v for v in (by_job, lim.max_job_duration) if v]
    return min(caps) if caps else 0


def prepare(cfg: Settings, default_image: str = "") -> None:
    this = identity.load(secret_names=cfg.secret_variables)
    _check_host()
    spec, lim = boot_spec(cfg, this, default_image)
    layout.private_dirs(cfg.root, layout.overlays_dir(cfg.root), cache_host_dir(cfg, this))
    # A crashed runner or a killed earlier attempt may have left this job's machine behind.
    machine.teardown(this.machine, this.unit, layout.overlay_dir(cfg.root, this.machine),
                     cfg.stop_timeout)
    pool.release(this.machine, cfg.stop_timeout)
    network.release(this.machine)
    state.remove(this.machine)
    image_stat = spec.image_path.stat()
    saved = state.MachineState(
        machine=this.machine, unit=this.unit, image=spec.image, backend=spec.backend.value,
        root=str(cfg.root), overlay=str(spec.overlay) if spec.overlay else None,
        shell=cfg.shell, secret_variables=cfg.secret_variables,
        image_path=str(spec.image_path), image_id=f"{image_stat.st_dev}:{image_stat.st_ino}",
        owner=state.owner_identity(), job_dir=this.job_dir,
        step_start_timeout=cfg.step_start_timeout)
    # Written before the boot, so that `gc` knows whose machine this is even if we are killed
    # while it boots.
    if cfg.persistent_builds:
        base = builds_base(cfg, this)
        layout.private_dirs(cfg.root, base)
        with fs.locked(base / ".lock"):
            slot = claim_builds_slot(cfg, this)
            spec = dataclasses.replace(spec, binds=(*spec.binds, (slot, cfg.builds_dir)))
            saved = saved._replace(builds_slot=str(slot))
            state.write(saved)
    else:
        state.write(saved)
    # The step status directory too: the job's shell writes its exit status there.
    user_dirs = [cfg.builds_dir, f"{cfg.cache_dir}/{this.project_path}", layout.RESULTS_INSIDE]
    pool_size = pool.size(cfg, spec.image, lim)
    if pool_size and pool.take(cfg, spec, lim, saved, user_dirs):
        pool.refill(cfg, spec, lim, pool_size, saved.owner)
        return
    reap.wait_for_space(cfg.root, cfg.stop_timeout)
    log.info(f"nspawn-runner: booting machine {this.machine} from image {spec.image!r} "
             f"({spec.backend} backend)")
    start = time.monotonic()
    try:
        net = network.attach(this.machine, cfg.network_options(lim.network))
        machine.boot(dataclasses.replace(
            spec, nspawn_options=spec.nspawn_options + net.nspawn_options))
        leader, root_dir = machine.describe(this.machine)
        saved = saved._replace(leader=leader, status_dev=status.device(leader),
                               snapshot=root_dir if spec.backend is backends.Backend.BTRFS
                               else "")
        if not saved.status_dev:
            raise SystemFailure(f"machine {this.machine} booted, but its {layout.RESULTS_INSIDE} "
                                "cannot be read from the host; see journalctl -u " + this.unit)
        network.wait_usable(this.machine, net, spec.image,
                            partial(status.has, saved.leader, saved.status_dev,
                                netplan.READY_MARK))
        if lim.user != "root":
            home = machine.ensure_user(this.machine, lim.user, user_dirs)
            saved = saved._replace(user=lim.user, home=home)
        state.write(saved)
    except BaseException:
        # No step has run: nothing in the machine needs a clean shutdown, and a guest still
        # booting would not see nspawn's poweroff request (machine.kill_guest).
        machine.teardown(this.machine, this.unit, spec.overlay, cfg.stop_timeout, discard=True)
        network.release(this.machine)
        state.remove(this.machine)
        raise
    log.info(f"nspawn-runner: machine {this.machine} ready in {time.monotonic() - start:.1f}s")
    if pool_size or pool.exists():
        # After the job's own boot, which it would otherwise compete with for the CPU. With
        # pool_size 0 (lowered since), this stops the idle machines of the old pool.
        pool.refill(cfg, spec, lim, pool_size, saved.owner)
