"""`nspawn-runner shell IMAGE [-- COMMAND...]`: a command (or a login shell) in a throwaway copy
of a build image, as the calling user, with the user's home.

A non-booted `systemd-nspawn` on an overlay of the image: the image is never written, and the
overlay's upper layer is removed afterwards (kept with --keep). The host's /etc/passwd and
/etc/group are bound read-only, so the user has the same name, uid, gid and groups inside;
the home is bound read-write and the current directory kept when it is under it. The image's
personality applies (an i386 image says i686). The command's exit status is ours.

Safe to grant through sudo (examples/sudoers.d/nspawn-runner): it acts for SUDO_USER, never as
root for them; no_new_privs and an empty capability set mean the image's setuid programs do
not make them root (there is no user namespace: root inside would be root outside); binds
are checked with the user's own rights and may not cover system directories (a bind over
/etc/passwd would redefine who they are); no option reaches systemd-nspawn unchecked, there
is no boot and no device; every use is logged to the journal with the user and command line."""

from __future__ import annotations

import os
import posixpath
import shlex
import signal
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nspawn_runner import log, proc, settings
from nspawn_runner.errors import SystemFailure
from nspawn_runner.host import fs
from nspawn_runner.host.backends import escape
from nspawn_runner.images import names, spec
from nspawn_runner.local.transfer import Caller, caller

NETWORKS = ("host", "private", "none")
# Destinations a bind may not cover: what decides who the user is and what runs as root.
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
               "/proc", "/root", "/run", "/sbin", "/sys", "/usr", "/var")
SHELLS = ("/bin/bash", "/bin/sh")
TAG = "nspawn-runner-shell"


class ShellRefused(SystemFailure):
    """What the shell command will not do, and why."""


@dataclass(frozen=True)
class Bind:
    source: Path  # resolved on the host
    dest: str
    writable: bool


@dataclass(frozen=True)
class Options:
    image: str
    command: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()  # PATH[:DEST]
    binds_ro: tuple[str, ...] = ()
    network: str | None = None  # None: from the settings
    keep: bool = False


def default_network(setting: str) -> str:
    """The runner's network setting, in this command's terms: host is host, private (loopback
    only) is none, veth (a link to the host) is private."""
    return {"host": "host", "private": "none", "veth": "private"}.get(setting, "none")


def _as_user(user: Caller, test: str, path: Path) -> bool:
    if user.is_root:
        return True
    result = proc.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
                       "--reset-env", "--", "test", test, str(path)], check=False)
    return result.returncode == 0


def parse_bind(text: str, user: Caller, writable: bool) -> Bind:
    option = "--bind" if writable else "--bind-ro"
    source_text, sep, dest = text.partition(":")
    if not source_text:
        raise ShellRefused(f"{option} {text!r}: give PATH or PATH:DEST")
    source = Path(os.path.realpath(os.path.expanduser(source_text)))
    dest = dest if sep else str(source)
    if not dest.startswith("/") or "//" in dest or ".." in dest.split("/") or \
            posixpath.normpath(dest) != (dest.rstrip("/") or "/"):
        raise ShellRefused(f"{option} {text!r}: DEST must be a plain absolute path (no '..', "
                           "'.' or '//')")
    dest = posixpath.normpath(dest)
    covered = [d for d in SYSTEM_DIRS if dest == d or dest.startswith(d + "/") or d.startswith(
        dest.rstrip("/") + "/") or dest == "/"]
    if covered:
        raise ShellRefused(f"{option} {text!r}: {dest} would cover {covered[0]}, a system "
                           "directory of the image; bind it elsewhere (under your home, /mnt, "
                           "/srv, /opt or /tmp)")
    try:
        info = source.stat()
    except OSError:
        info = None
    readable = info is not None and _as_user(user, "-r", source)
    if not readable:
        raise ShellRefused(f"{option} {text!r}: {source} does not exist or {user.name} may not "
                           "read it")
    assert info is not None
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)
            or stat.S_ISSOCK(info.st_mode)):
        raise ShellRefused(f"{option} {text!r}: {source} is not a file, directory or socket")
    if stat.S_ISDIR(info.st_mode) and not _as_user(user, "-x", source):
        raise ShellRefused(f"{option} {text!r}: {user.name} may not enter {source}")
    if writable and not _as_user(user, "-w", source):
        raise ShellRefused(f"{option} {text!r}: {user.name} may not write {source}; use "
                           "--bind-ro")
    return Bind(source, dest, writable)


def _shell_of(user: Caller, image_path: Path) -> str:
    import pwd

    login = pwd.getpwuid(user.uid).pw_shell
    for candidate in (login, *SHELLS):
        if candidate and os.path.lexists(image_path / candidate.lstrip("/")):
            return candidate
    raise ShellRefused(f"image {image_path.name} has no shell ({login}, {', '.join(SHELLS)}); "
                       "give a command after --")


def command_line(opts: Options, user: Caller, cfg: settings.Settings, machine: str,
                 upper: Path, cwd: str, binds: Sequence[Bind], interactive: bool,
                 environ: dict[str, str]) -> list[str]:
    """The systemd-nspawn command; nothing in it comes from the user unchecked."""
    name, image_path = names.resolve(cfg, opts.image)
    image_spec = spec.load(cfg, name)
    personality = image_spec.personality if image_spec else ""
    network = opts.network or default_network(cfg.network)
    command = list(opts.command) or [_shell_of(user, image_path), "-l"]
    keep_env = [f"--setenv={k}={v}" for k, v in sorted(environ.items())
                if (k in ("TERM", "LANG", "LANGUAGE", "TZ") or k.startswith("LC_"))
                and "\n" not in v]
    return [
        "systemd-nspawn",
        "--quiet",
        f"--machine={machine}",
        f"--directory={image_path}",
        f"--overlay={escape(image_path)}:{escape(upper)}:/",
        *([f"--personality={personality}"] if personality else []),
        "--settings=no",
        "--link-journal=no",
        # A stub init as PID 1: signals (Ctrl-C) and zombies behave as on the host.
        "--as-pid2",
        "--no-new-privileges=yes",
        "--drop-capability=all",
        f"--console={'interactive' if interactive else 'pipe'}",
        *(["--private-network"] if network == "none" else
          ["--network-veth"] if network == "private" else []),
        "--bind-ro=/etc/passwd",
        "--bind-ro=/etc/group",
        f"--bind={escape(user.home)}",
        *[f"--bind{'' if b.writable else '-ro'}={escape(b.source)}:{escape(b.dest)}"
          for b in binds],
        f"--user={user.name}",
        f"--chdir={cwd}",
        *keep_env,
        "--",
        *command,
    ]


def _journal(user: Caller, opts: Options, binds: Sequence[Bind]) -> None:
    shown = shlex.join(["nspawn-runner", "shell", opts.image, *(
        a for b in binds for a in (f"--bind{'' if b.writable else '-ro'}",
                                   f"{b.source}:{b.dest}")), "--", *opts.command])
    message = f"user={user.name} uid={user.uid} cwd={os.getcwd()} command: {shown}"
    result = proc.run(["logger", f"--tag={TAG}", "--priority=auth.notice", "--", message],
                      check=False)
    if result.returncode != 0:
        raise SystemFailure(f"could not log this use to the journal (logger: "
                            f"{result.stderr.strip() or result.returncode}); refusing to run "
                            "unlogged")


def _wait(child: subprocess.Popen[bytes]) -> int:
    """The command's status. Keys from the terminal are the command's: we ignore SIGINT and
    SIGQUIT (systemd-nspawn gets them too) and pass SIGTERM on, then wait for it to end
    before the layer is removed."""
    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    saved = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
             signal.SIGQUIT: signal.signal(signal.SIGQUIT, signal.SIG_IGN),
             signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    try:
        return child.wait()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def machine_name(user: Caller, pid: int) -> str:
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "-"
                   for c in user.name)[:20]
    return f"nrs-{safe}-{pid}"


EXIT_OWN_FAILURE = 125  # as exec (and podman, docker): the command never ran


def main(opts: Options) -> int:
    """The command's exit status, or 125 with the reason on stderr when it could not run."""
    from nspawn_runner.errors import NspawnRunnerError

    try:
        return run(opts)
    except NspawnRunnerError as e:
        log.error(str(e))
        return EXIT_OWN_FAILURE


def run(opts: Options) -> int:
    if os.geteuid() != 0:
        raise ShellRefused("shell starts systemd-nspawn, which needs root: run it with sudo "
                           "(examples/sudoers.d/nspawn-runner grants exactly this)")
    user = caller()
    if os.environ.get("SUDO_UID") and user.is_root and os.environ["SUDO_UID"] != "0":
        raise ShellRefused("could not tell who called sudo")
    if opts.network is not None and opts.network not in NETWORKS:
        raise ShellRefused(f"--network={opts.network}: use one of {', '.join(NETWORKS)}")
    if not user.home.startswith("/") or user.home == "/" or not os.path.isdir(user.home):
        raise ShellRefused(f"{user.name}'s home {user.home!r} is not a directory; a shell "
                           "needs one to bind")
    names.validate_name(opts.image, f"invalid image name {opts.image!r}")
    binds = [*(parse_bind(b, user, True) for b in opts.binds),
             *(parse_bind(b, user, False) for b in opts.binds_ro)]
    cfg = settings.load()
    cwd = os.getcwd()
    home = user.home.rstrip("/")
    cwd = cwd if cwd == home or cwd.startswith(home + "/") else home
    machine = machine_name(user, os.getpid())
    layer = cfg.root / "local" / "shells" / machine
    layer.mkdir(parents=True)
    os.chmod(layer.parent, 0o700)
    upper = layer / "upper"
    upper.mkdir()
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    try:
        argv = command_line(opts, user, cfg, machine, upper, cwd, binds, interactive,
                            dict(os.environ))
        _journal(user, opts, binds)
        code = _wait(proc.spawn(argv, stdin=None))
    finally:
        if opts.keep:
            log.info(f"nspawn-runner: the writable layer is kept in {upper}")
        else:
            fs.remove_tree(layer)
    return code if code >= 0 else 128 - code
