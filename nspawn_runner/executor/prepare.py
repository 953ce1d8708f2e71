"""The prepare stage: boot the job's machine from its image, return once it is up.

See docs/architecture.md for the lifecycle and ../shared/custom-executor-protocol.md for the
contract; config.py, run.py and cleanup.py are the other stages."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from pathlib import Path

from nspawn_runner import layout, log, settings
from nspawn_runner.errors import SystemFailure
from nspawn_runner.executor import identity, state
from nspawn_runner.host import backends, limits, machine, network
from nspawn_runner.images import names
from nspawn_runner.settings import Settings

_SERVER = re.compile(r"^[A-Za-z0-9.:-]+$")


def _server_dir(this: identity.Job) -> str:
    return this.server if _SERVER.match(this.server) and ".." not in this.server else "local"


def cache_host_dir(cfg: Settings, this: identity.Job) -> Path:
    # Per GitLab instance and project: a job only ever sees its own project's caches.
    return layout.cache_root(cfg.root) / _server_dir(this) / this.project_path


def builds_host_dir(cfg: Settings, this: identity.Job,
                    environ: dict[str, str] | None = None) -> Path:
    """The persistent builds directory of the job's project and concurrent slot. The slot is
    a job variable (CI_CONCURRENT_ID) a job could set: it can only ever pick another slot of
    its own project, never another project's checkout."""
    env = os.environ if environ is None else environ
    slot = env.get("CUSTOM_ENV_CI_CONCURRENT_ID", "0")
    slot = slot if slot.isdigit() and len(slot) < 10 else "0"
    return layout.builds_root(cfg.root) / _server_dir(this) / this.project_path / slot


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


def boot_spec(cfg: Settings, this: identity.Job,
              default_image: str = "") -> tuple[machine.BootSpec, limits.Limits]:
    """How to boot the job's machine, and the limits that apply to it (the settings',
    overridden by the image file's [limits])."""
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
            (layout.results_dir(this.machine), layout.RESULTS_INSIDE),
            *([(builds_host_dir(cfg, this), cfg.builds_dir)] if cfg.persistent_builds else []),
        ),
        binds_ro=tuple(binds_ro),
        description=f"nspawn-runner job {this.job_id} on image {name}",
        properties=tuple(lim.unit_properties()),
        idmap=lim.private_users,
        nspawn_options=tuple(lim.nspawn_args()),
    ), lim


def prepare(cfg: Settings, default_image: str = "") -> None:
    this = identity.load(secret_names=cfg.secret_variables)
    spec, lim = boot_spec(cfg, this, default_image)
    _check_host()
    # A crashed runner or a killed earlier attempt may have left this job's machine behind.
    machine.teardown(this.machine, this.unit, layout.overlay_dir(cfg.root, this.machine),
                     cfg.stop_timeout)
    network.release(this.machine)
    state.remove(this.machine)
    log.info(f"nspawn-runner: booting machine {this.machine} from image {spec.image!r} "
             f"({spec.backend} backend)")
    start = time.monotonic()
    image_stat = spec.image_path.stat()
    saved = state.MachineState(
        machine=this.machine, unit=this.unit, image=spec.image, backend=spec.backend.value,
        root=str(cfg.root), overlay=str(spec.overlay) if spec.overlay else None,
        shell=cfg.shell, secret_variables=cfg.secret_variables,
        image_path=str(spec.image_path), image_id=f"{image_stat.st_dev}:{image_stat.st_ino}",
        owner=state.owner_identity())
    # Written before the boot, so that `gc` knows whose machine this is even if we are killed
    # while it boots.
    state.write(saved)
    try:
        net = network.attach(this.machine, cfg.network_options(lim.network))
        machine.boot(dataclasses.replace(
            spec, nspawn_options=spec.nspawn_options + net.nspawn_options))
        network.wait_usable(this.machine, net, spec.image)
        if lim.user != "root":
            # The step status directory too: the job's shell writes its exit status there.
            home = machine.ensure_user(this.machine, lim.user,
                                       [cfg.builds_dir, f"{cfg.cache_dir}/{this.project_path}",
                                        layout.RESULTS_INSIDE])
            saved = saved._replace(user=lim.user, home=home)
            state.write(saved)
    except BaseException:
        machine.teardown(this.machine, this.unit, spec.overlay, cfg.stop_timeout)
        network.release(this.machine)
        state.remove(this.machine)
        raise
    log.info(f"nspawn-runner: machine {this.machine} ready in {time.monotonic() - start:.1f}s")
