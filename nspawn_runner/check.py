"""`nspawn-runner check`: can this host run jobs? Every check gives a typed `Check` (ok, warn,
FAIL or skip, a detail and a fix); a FAIL means jobs cannot run, a warning that they can but
something is worth fixing. The checks see the machine only through `Host`, which the tests
replace with a fake."""

from __future__ import annotations

import enum
import fnmatch
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nspawn_runner import layout, settings, table
from nspawn_runner.errors import CommandError, SystemFailure
from nspawn_runner.executor import identity
from nspawn_runner.host import backends, fs, netplan, network
from nspawn_runner.host.backends import Backend
from nspawn_runner.images import names as image_names
from nspawn_runner.images import spec
from nspawn_runner.settings import Settings

MIN_SYSTEMD = 247
GIB = 2**30
FREE_FAIL = 1 * GIB  # a job's writes and its project's caches go to the state root
FREE_WARN = 5 * GIB
# Commands the driver runs on the host, and the Debian package of each.
COMMANDS = {"systemd-nspawn": "systemd-container", "machinectl": "systemd-container",
            "systemd-run": "systemd", "systemctl": "systemd", "journalctl": "systemd"}
QUICKSTART = "docs/quickstart.md"


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "skip"  # not tried, because something it needs failed or was not asked for


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status is Status.FAIL]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status is Status.WARN]

    def render(self, colour: bool = False) -> str:
        """The table; with `colour`, FAIL in red and warn in yellow (for a terminal)."""
        rows = [("CHECK", "STATUS", "DETAIL")]
        for c in self.checks:
            rows.append((c.name, c.status.value, _one_line(c.detail)))
            if c.fix:
                rows.append(("", "", f"fix: {_one_line(c.fix)}"))
        text = table.render(rows)
        if colour:
            text = table.paint_column(text, 1, {Status.FAIL.value: "error",
                                                Status.WARN.value: "warn"})
        return text + "\n" + self.summary() + "\n"

    def summary(self) -> str:
        warned = f", {len(self.warnings)} warning{'s' * (len(self.warnings) != 1)}"
        if self.failed:
            return (f"{len(self.failed)} check{'s' * (len(self.failed) != 1)} failed"
                    f"{warned if self.warnings else ''}: jobs cannot run on this host until "
                    "the FAIL lines are fixed")
        return f"all checks passed{warned if self.warnings else ''}"

    def to_json(self) -> str:
        return json.dumps({"ok": not self.failed,
                           "checks": [{**asdict(c), "status": c.status.value}
                                      for c in self.checks]}, indent=2) + "\n"

    def raise_for_failures(self) -> None:
        if self.failed:
            raise SystemFailure(f"host check failed: {', '.join(c.name for c in self.failed)}")


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))


class Host:
    """The machine as the checks see it."""

    def __init__(self) -> None:
        self._boots = 0

    def is_root(self) -> bool:
        return os.geteuid() == 0

    def systemd_booted(self) -> bool:
        # What sd_booted() tests: systemd creates this directory when it is PID 1.
        return os.path.isdir("/run/systemd/system")

    def pid1(self) -> str:
        try:
            return Path("/proc/1/comm").read_text().strip()
        except OSError:
            return "unknown"

    def nspawn_version(self) -> str:
        # Not `systemd --version`: the systemd binary is not on PATH on Debian.
        from nspawn_runner import proc

        return proc.run(["systemd-nspawn", "--version"], capture=True, timeout=30).stdout

    def which(self, command: str) -> str | None:
        return shutil.which(command)

    def machines(self) -> list[str]:
        from nspawn_runner.host import machined

        return machined.machines()

    def filesystem(self, path: Path) -> str:
        return fs.filesystem(path)

    def backend(self, cfg: Settings) -> Backend:
        return backends.choose(cfg.backend, cfg.root)

    def free_bytes(self, path: Path) -> int:
        return shutil.disk_usage(path).free

    def gitlab_runner(self, cfg: Settings) -> Path | None:
        from nspawn_runner.executor import prepare as stages

        return stages.gitlab_runner_binary(cfg)

    def networkd_active(self) -> bool:
        return network.networkd_active()

    def has_ipv6(self) -> bool:
        return netplan.host_has_ipv6()

    def ipv4_networks(self) -> list[str]:
        return [str(n) for n in netplan.host_ipv4_networks()]

    def resolvers(self, cfg: Settings) -> tuple[str, str]:
        return netplan.resolvers(cfg.network_dns)

    def network_probe(self, cfg: Settings, image: str, path: Path, timeout: int,
                      target: tuple[str, int] | None) -> str:
        """Boot `image` as an isolated job (volatile backend), wait until its network is
        usable, then resolve and connect to `target` from inside. Returns the address
        reached (or ""); raises SystemFailure saying what failed. Leaves nothing."""
        from nspawn_runner.host import machine

        name = f"{identity.MACHINE_PREFIX}check-{os.getpid()}-net"
        attached = network.attach(name, cfg.network_options("isolated"))
        try:
            spec = machine.BootSpec(
                machine=name, unit=f"{identity.UNIT_PREFIX}{name}.service", image=image,
                image_path=path, backend=Backend.VOLATILE, root=cfg.root, boot_timeout=timeout,
                stop_timeout=cfg.stop_timeout, nspawn_options=attached.nspawn_options,
                description=f"nspawn-runner check: network of a job on image {image}",
                properties=(f"--property=RuntimeMaxSec={timeout + 300}",))
            machine.boot(spec)
            try:
                # No state file for a test boot: wait_usable asks inside the machine.
                network.wait_usable(name, attached, image, lambda: False)
                return network.probe(name, *target) if target else ""
            finally:
                machine.teardown(name, spec.unit, None, cfg.stop_timeout)
        finally:
            network.release(name)

    def boot(self, cfg: Settings, image: str, path: Path, timeout: int) -> float:
        """Boot `image` as a job would (on the volatile backend: nothing is written to disk),
        run the job shell in it through systemd-run as the run stage does, tear it down.
        Returns the seconds until the shell ran; raises SystemFailure saying what failed."""
        from nspawn_runner import proc
        from nspawn_runner.host import machine

        self._boots += 1
        name = f"{identity.MACHINE_PREFIX}check-{os.getpid()}-{self._boots}"
        unit = f"{identity.UNIT_PREFIX}{name}.service"
        spec = machine.BootSpec(
            machine=name, unit=unit, image=image, image_path=path, backend=Backend.VOLATILE,
            root=cfg.root, boot_timeout=timeout, stop_timeout=cfg.stop_timeout,
            description=f"nspawn-runner check: test boot of image {image}",
            # gc only collects job machines: should we be killed before the teardown, systemd
            # stops this one by itself.
            properties=(f"--property=RuntimeMaxSec={timeout + 300}",))
        start = time.monotonic()
        machine.boot(spec)
        try:
            shell = layout.SHELLS.get(cfg.shell, "/bin/sh")
            try:
                proc.run(["systemd-run", "--quiet", f"--machine={name}", "--pipe", "--wait",
                          "--collect", "--service-type=exec", "--", shell, "-c", "true"],
                         timeout=60)
            except CommandError as e:
                raise SystemFailure(
                    f"image {image!r} booted, but running {shell} in it failed "
                    f"({e.stderr.strip() or e}); a job's steps would fail the same way"
                ) from None
            return time.monotonic() - start
        finally:
            machine.teardown(name, unit, None, cfg.stop_timeout)


def _systemd(host: Host, have_nspawn: bool) -> list[Check]:
    checks = []
    if host.systemd_booted():
        checks.append(Check("systemd (PID 1)", Status.OK, "systemd is PID 1"))
    else:
        checks.append(Check(
            "systemd (PID 1)", Status.FAIL, f"PID 1 is {host.pid1()!r}, not systemd: machines "
            "cannot be booted",
            "run nspawn-runner on a host booted with systemd (a VM or a machine; in a "
            "container only if it boots systemd, like the test bed: docs/testing.md)"))
    if not have_nspawn:
        checks.append(Check("systemd version", Status.SKIP, "systemd-nspawn not found"))
        return checks
    try:
        out = host.nspawn_version()
    except CommandError as e:
        checks.append(Check("systemd version", Status.FAIL, str(e),
                            "reinstall systemd-container"))
        return checks
    first = out.strip().splitlines()[0] if out.strip() else ""
    m = re.match(r"systemd (\d+)", first)
    if not m:
        checks.append(Check("systemd version", Status.WARN,
                            f"cannot tell from `systemd-nspawn --version`: {first!r}"))
    elif int(m.group(1)) < MIN_SYSTEMD:
        checks.append(Check("systemd version", Status.FAIL,
                            f"{first}: nspawn-runner needs systemd {MIN_SYSTEMD} or newer",
                            "upgrade the host (Debian 12 has systemd 252)"))
    else:
        checks.append(Check("systemd version", Status.OK, first))
    return checks


def _commands(host: Host) -> Check:
    missing = [c for c in COMMANDS if not host.which(c)]
    if not missing:
        return Check("commands", Status.OK, ", ".join(COMMANDS) + " found")
    packages = sorted({COMMANDS[c] for c in missing})
    return Check("commands", Status.FAIL, f"not found on PATH: {', '.join(missing)}",
                 f"apt-get install {' '.join(packages)}")


def _machined(host: Host) -> Check:
    try:
        found = host.machines()
    except SystemFailure as e:
        return Check("machined (D-Bus)", Status.FAIL, str(e),
                     "`machinectl list` must work: install systemd-container, start "
                     "systemd-machined and the system bus (dbus)")
    # machined always lists the host itself as ".host".
    running = len([m for m in found if m != ".host"])
    return Check("machined (D-Bus)", Status.OK,
                 f"systemd-machined answers ({running} machine{'s' * (running != 1)} running)")


def _cgroups(host: Host) -> Check:
    def fs(path: str) -> str:
        try:
            return host.filesystem(Path(path))
        except CommandError:
            return ""

    fix = ("boot the host with systemd.unified_cgroup_hierarchy=1 on the kernel command line "
           "(the default since Debian 11)")
    top = fs("/sys/fs/cgroup")
    if top == "cgroup2fs":
        return Check("cgroups", Status.OK, "unified (cgroup v2)")
    if top == "tmpfs":
        hybrid = fs("/sys/fs/cgroup/unified") == "cgroup2fs"
        return Check("cgroups", Status.WARN,
                     f"{'hybrid' if hybrid else 'legacy'} (cgroup v1): machines boot, but "
                     "systemd deprecates cgroup v1 and images with systemd 256 or newer may "
                     "refuse to boot on it", fix)
    return Check("cgroups", Status.WARN,
                 f"cannot tell the layout: /sys/fs/cgroup is {top or 'not mounted'!r}", fix)


def _state_root(host: Host, cfg: Settings) -> list[Check]:
    root = cfg.root
    where = cfg.origins.get("root", "default")
    if not root.is_dir():
        return [Check("state root", Status.FAIL, f"{root} does not exist (root, {where})",
                      f"mkdir -p {cfg.images_dir} and make an image there ({QUICKSTART}), "
                      "or set root to the right directory")]
    checks = []
    fs = host.filesystem(root)
    backend = host.backend(cfg)
    how = "auto" if cfg.backend == "auto" else f"backend = {cfg.backend!r}"
    detail = f"{root} on {fs}: {backend.value} backend ({how})"
    if cfg.private_users and backend is not Backend.BTRFS:
        # prepare refuses this combination for every job: nspawn cannot idmap an overlay.
        checks.append(Check("state root", Status.FAIL,
                            detail + ": private_users needs the btrfs backend",
                            "put the state root on btrfs, or set private_users = false"))
    elif backend is Backend.BTRFS and fs != "btrfs":
        checks.append(Check("state root", Status.WARN,
                            detail + ": not btrfs, so every job copies the whole image",
                            'use backend = "auto" (overlay here), or put root on btrfs'))
    else:
        checks.append(Check("state root", Status.OK, detail))
    free = host.free_bytes(root)
    text = f"{free / GIB:.1f} GiB free on {root}"
    fix = ("free space there, or move root to a larger file system: jobs' writes (overlay "
           "backend) and the projects' caches go there")
    if free < FREE_FAIL:
        checks.append(Check("free space", Status.FAIL, text, fix))
    elif free < FREE_WARN:
        checks.append(Check("free space", Status.WARN, text, fix))
    else:
        checks.append(Check("free space", Status.OK, text))
    return checks


def _images(host: Host, cfg: Settings, boot: bool, cannot_boot: str,
            boot_timeout: int) -> list[Check]:
    names = image_names.available(cfg)
    files = set(spec.names(cfg))
    if not names:
        return [Check("images", Status.FAIL, f"no images in {cfg.images_dir}",
                      f"write an image file into {cfg.images_config_dir} (examples/images/) "
                      "and run `nspawn-runner chroot-create NAME` (docs/quickstart.md)")]
    checks = [Check("images", Status.OK, f"{len(names)} in {cfg.images_dir}: "
                    f"{', '.join(names)}")]
    if cfg.default_image and cfg.default_image not in names:
        origin = cfg.origins.get("default_image", "default")
        make = (f"nspawn-runner chroot-create {cfg.default_image}"
                if cfg.default_image in files else "make it")
        checks.append(Check("default image", Status.FAIL,
                            f"default_image {cfg.default_image!r} ({origin}) is not in "
                            f"{cfg.images_dir}",
                            f"{make}, or set default_image to one of: {', '.join(names)}"))
    for name in names:
        label = f"image {name}"
        if cfg.allowed_images and not any(fnmatch.fnmatchcase(name, p)
                                          for p in cfg.allowed_images):
            checks.append(Check(label, Status.SKIP, "not in allowed_images: jobs cannot use it"))
            continue
        try:
            _, path = image_names.resolve(cfg, "", name)
        except SystemFailure as e:
            checks.append(Check(label, Status.FAIL, str(e),
                                f"install systemd, systemd-sysv and dbus in it, or remove "
                                f"{cfg.images_dir / name}"))
            continue
        try:
            # prepare reads the image's file (per-image limits) for every job.
            spec.load(cfg, name)
        except SystemFailure as e:
            checks.append(Check(label, Status.FAIL, str(e),
                                f"fix {spec.path_of(cfg, name)} (docs/images.md)"))
            continue
        if not boot:
            checks.append(Check(label, Status.OK, f"{path} has an init; not booted (--no-boot)"))
            continue
        if cannot_boot:
            checks.append(Check(label, Status.SKIP, f"{path} has an init; not booted: "
                                f"{cannot_boot}"))
            continue
        try:
            seconds = host.boot(cfg, name, path, boot_timeout or cfg.boot_timeout)
        except SystemFailure as e:
            checks.append(Check(label, Status.FAIL, str(e),
                                f"try it by hand: systemd-nspawn -D {path} --boot (the image "
                                "needs systemd, systemd-sysv and dbus)"))
            continue
        checks.append(Check(label, Status.OK,
                            f"boots and runs {layout.SHELLS.get(cfg.shell, cfg.shell)} "
                            f"({seconds:.1f}s)"))
    return checks


def _image_files(cfg: Settings) -> list[Check]:
    """Every image file in images_config_dir, also those whose image is not built yet (the
    built ones are read again with their image in _images)."""
    built = set(image_names.available(cfg))
    checks = []
    for path in spec.files(cfg):
        name = path.stem
        label = f"image file {path.name}"
        try:
            image_names.validate_name(name)
        except SystemFailure:
            checks.append(Check(label, Status.FAIL, f"{path} is ignored: {name!r} is not a "
                                f"valid image name ({image_names.NAME_RULE})",
                                "rename the file"))
            continue
        if name in built:
            continue
        try:
            spec.load(cfg, name)
        except SystemFailure as e:
            checks.append(Check(label, Status.FAIL, str(e), f"fix {path} (docs/images.md)"))
            continue
        checks.append(Check(label, Status.WARN, f"image {name!r} is not built yet",
                            f"nspawn-runner chroot-create {name}"))
    return checks


def _gitlab_config(path: Path, cfg: Settings, given: bool) -> list[Check]:
    from nspawn_runner.gitlab import verify

    images = set(image_names.available(cfg)) if cfg.root.is_dir() else set()
    return [Check(f.name, Status(f.status), f.detail, f.fix)
            for f in verify.verify(path, cfg, images, set(spec.names(cfg)),
                                   unmerged_fails=given)]


def _probe_target(url: str) -> tuple[str, int] | None:
    from urllib.parse import urlsplit

    if not url:
        return None
    parts = urlsplit(url if "://" in url else f"//{url}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    if not parts.hostname or not port:
        raise SystemFailure(f"network_check_url {url!r} has no host or a bad port: use a URL "
                            "such as https://gitlab.example.com")
    return parts.hostname, port


def _network(host: Host, cfg: Settings, image: tuple[str, Path] | None,
             cannot_boot: str, boot_timeout: int) -> list[Check]:
    """Job networking (docs/networking.md): the mode, then for "isolated" what the host
    needs, and a job-like machine that must get out."""
    doc = netplan.DOCS
    if cfg.network == "host":
        return [Check("network", Status.WARN,
                      'network = "host": jobs share the host\'s network, so every service '
                      "bound to the host's addresses, 127.0.0.1 included, is reachable from "
                      "every job", f'network = "isolated" ({doc})')]
    if cfg.network == "none":
        return [Check("network", Status.OK, 'network = "none": jobs have only loopback')]
    v6 = ("IPv6 from " + str(netplan.ula_prefix()) if host.has_ipv6()
          else "IPv4 only (the host has no IPv6 default route)")
    checks = [Check("network", Status.OK, f'network = "isolated": a zone per job, /28s of '
                    f"{cfg.network_ipv4_pool}, {v6}")]
    tools = [c for c in ("nft", "ip", "networkctl") if not host.which(c)]
    if tools:
        checks.append(Check("network tools", Status.FAIL, f"not found: {', '.join(tools)}",
                            "apt-get install nftables iproute2 systemd"))
    if host.networkd_active():
        checks.append(Check("networkd", Status.OK, "systemd-networkd is running"))
    else:
        checks.append(Check("networkd", Status.FAIL,
                            "systemd-networkd is not running: isolated jobs get no address",
                            f"{netplan.NETWORKD_FIX} ({doc}), or set network = \"host\""))
    clash = netplan.pool_conflicts(cfg.network_ipv4_pool, host.ipv4_networks())
    if clash:
        checks.append(Check("network pool", Status.FAIL,
                            f"network_ipv4_pool {cfg.network_ipv4_pool} overlaps the host's "
                            f"network{'s' * (len(clash) > 1)} {', '.join(clash)}",
                            "set network_ipv4_pool to a private range the host does not use"))
    try:
        text, source = host.resolvers(cfg)
        servers = netplan.parse_resolv_conf(text)[0]
        checks.append(Check("name resolution", Status.OK,
                            f"jobs use {', '.join(servers)} (from {source})"))
    except SystemFailure as e:
        checks.append(Check("name resolution", Status.FAIL, str(e),
                            f"network_dns = [\"192.0.2.53\"] with your DNS servers ({doc})"))
    if any(c.status is Status.FAIL for c in checks):
        return checks
    why = cannot_boot or ("" if image else "no image to boot")
    if why or image is None:
        return [*checks, Check("masquerading", Status.SKIP, f"no job machine booted: {why}")]
    try:
        target = _probe_target(cfg.network_check_url)
        reached = host.network_probe(cfg, image[0], image[1], boot_timeout or cfg.boot_timeout,
                                     target)
    except SystemFailure as e:
        return [*checks, Check("masquerading", Status.FAIL, str(e),
                               f"see {doc} (troubleshooting); another firewall may drop "
                               "forwarded packets")]
    checks.append(Check("forwarding", Status.OK,
                        f"a job's machine on image {image[0]} got its address and route"))
    if target is None:
        checks.append(Check("masquerading", Status.SKIP,
                            "not tried: network_check_url is empty",
                            "set network_check_url to a URL jobs need, e.g. your GitLab's"))
    else:
        checks.append(Check("masquerading", Status.OK,
                            f"a job's machine reached {target[0]} ({reached}) on port "
                            f"{target[1]}"))
    return checks


def _gitlab_runner(host: Host, cfg: Settings) -> Check:
    try:
        found = host.gitlab_runner(cfg)
    except SystemFailure as e:
        return Check("gitlab-runner", Status.FAIL, str(e),
                     "fix the gitlab_runner setting, or leave it empty to search PATH")
    if found is None:
        return Check("gitlab-runner", Status.WARN,
                     "not found on PATH: jobs run, but skip caches and artifacts",
                     "install gitlab-runner, or set gitlab_runner to its path")
    return Check("gitlab-runner", Status.OK, f"{found} (bound into every job's machine)")


def run(host: Host, config: Path, environ: dict[str, str] | None = None, boot: bool = True,
        boot_timeout: int = 0, gitlab_config: Path | None = None,
        gitlab_config_given: bool = True) -> Report:
    """All checks, in the order a newcomer would fix them. `boot_timeout` 0: the
    boot_timeout setting. `gitlab_config`: also check the driver's blocks in this
    gitlab-runner config.toml; a file found at the default path rather than given
    (`gitlab_config_given` false) without such a block is a warning, not a failure."""
    checks: list[Check] = []
    cfg: Settings | None = None
    try:
        cfg = settings.load(config, environ)
    except SystemFailure as e:
        checks.append(Check("settings", Status.FAIL, str(e),
                            "fix the settings file (docs/configuration.md)"))
    else:
        from_file = config.is_file()
        checks.append(Check("settings", Status.OK,
                            f"{config}" if from_file else f"{config} absent: built-in defaults"))
    root_ok = host.is_root()
    if not root_ok:
        checks.append(Check("root", Status.WARN, f"running as uid {os.geteuid()}: images are "
                            "not booted and some checks may fail for lack of permissions",
                            "run `nspawn-runner check` as root: gitlab-runner runs the driver as "
                            "root"))
    command = _commands(host)
    checks += _systemd(host, host.which("systemd-nspawn") is not None)
    checks.append(command)
    machined = _machined(host)
    checks.append(machined)
    checks.append(_cgroups(host))
    if cfg is None:
        return Report(tuple(checks))
    checks += _state_root(host, cfg)
    cannot_boot = next((reason for bad, reason in (
        (not root_ok, "not running as root"),
        (not host.systemd_booted(), "systemd is not PID 1"),
        (command.status is Status.FAIL, "commands missing"),
        (machined.status is Status.FAIL, "machined unreachable"),
    ) if bad), "")
    probe_image = None
    if cfg.root.is_dir():
        image_checks = _images(host, cfg, boot, cannot_boot, boot_timeout)
        checks += image_checks
        good = [c.name.removeprefix("image ") for c in image_checks
                if c.name.startswith("image ") and c.status is Status.OK]
        name = cfg.default_image if cfg.default_image in good else (good or [""])[0]
        if name:
            probe_image = (name, image_names.resolve(cfg, "", name)[1])
    checks += _image_files(cfg)
    checks += _network(host, cfg, probe_image, cannot_boot or ("" if boot else "--no-boot"),
                       boot_timeout)
    checks.append(_gitlab_runner(host, cfg))
    if gitlab_config is not None:
        checks += _gitlab_config(gitlab_config, cfg, gitlab_config_given)
    return Report(tuple(checks))
