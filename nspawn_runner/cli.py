"""The command line. Only parses arguments and maps outcomes to exit codes (errors.finish); the
work happens in the modules it calls.

Parameters are written in typer's default-value style (`name: str = typer.Option(...)`), not
with `Annotated`: Debian 12's python3-typer is 0.7.0, which has no `Annotated` (nor `X | None`)
support, and the Debian package uses the archive's typer rather than shipping its own. Options
without a value use "" (or an empty list) for "not given", never None.

Conventions: `-h`/`--help` and `--version`; `-v`/`--verbose` and `--debug` before or after the
command; metavars that say what to give (NAME, SECONDS, PATH, URL); colour only on a terminal;
`--json` for what monitoring reads; output to a closed pipe (`| head`) keeps the exit status."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from nspawn_runner import __version__, log, schema, settings
from nspawn_runner.errors import SystemFailure, cancel_on_signals, finish

GITLAB_CONFIG = Path("/etc/gitlab-runner/config.toml")
KEYRING = Path("/etc/nspawn-runner/import-pubring.gpg")  # images/transport.py: DEFAULT_KEYRING
VERIFY_HELP = ("How to check a download: auto (the SHA256SUMS beside it, and its signature "
               "SHA256SUMS.gpg if there is one), signature (required), checksum or no.")
# Flags of the whole program that may also come after the command (`check -v`).
GLOBAL_FLAGS = ("-v", "--verbose", "--debug")
# Commands whose arguments are not ours to move: gitlab-runner's for `run` (which takes
# --verbose itself), anything after `--`, and a command to run after the given number of
# arguments (`chroot-login NAME sh -c 'ls -v'`).
OWN_ARGUMENTS = ("run",)
COMMAND_AFTER = {"chroot-login": 1}


def hoist_global_flags(args: Sequence[str]) -> list[str]:
    """`args` with the global flags given after the command moved before it."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith("-"):
            continue
        if arg in OWN_ARGUMENTS:
            break
        rest = args[i + 1:]
        end = rest.index("--") if "--" in rest else len(rest)
        if arg in COMMAND_AFTER:
            positional = [j for j, a in enumerate(rest[:end]) if not a.startswith("-")]
            if len(positional) > COMMAND_AFTER[arg]:
                end = positional[COMMAND_AFTER[arg]]
        flags = [a for a in rest[:end] if a in GLOBAL_FLAGS]
        kept = [a for a in rest[:end] if a not in GLOBAL_FLAGS]
        return [*args[:i], *flags, arg, *kept, *rest[end:]]
    return args


class _Group(TyperGroup):
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return list(super().parse_args(ctx, hoist_global_flags(args)))


app = typer.Typer(
    cls=_Group,
    help="GitLab Runner custom-executor driver: every CI job in its own systemd-nspawn machine.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def out(text: str, end: str = "\n") -> None:
    """Write to stdout. A reader that went away (`| head`) is no error and does not change the
    command's exit status: the rest of the output goes to /dev/null."""
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def interactive() -> bool:
    """A person at a terminal, who can answer a question."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def _do(action: Callable[[], object]) -> None:
    try:
        action()
    except BaseException as e:  # every outcome goes through the one mapping
        raise typer.Exit(finish(e)) from None


def _seconds(value: str, option: str) -> int:
    """A duration option ("90", "2m", "1h"), as in the settings file."""
    try:
        return schema.duration(value)
    except schema.BadValue as e:
        raise SystemFailure(f"{option} {value!r}: {e}") from None


def _version(value: bool) -> None:
    if value:
        out(f"nspawn-runner {__version__}")
        raise typer.Exit()


def _default_image_option() -> Any:
    return typer.Option("", "--default-image", metavar="NAME",
                        help="Image for jobs that name none.")


def _json_option() -> Any:
    return typer.Option(False, "--json", help="Print JSON instead of a table.")


@app.callback()
def _global(
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show the commands being run (also after the command)."),
    debug: bool = typer.Option(False, "--debug",
                               help="As --verbose, plus tracebacks of internal errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    if verbose or debug:
        log.set_verbose(True)


# The stages, called by gitlab-runner.

@app.command(short_help="Stage: print the JSON gitlab-runner reads.")
def config() -> None:
    """Stage: print the JSON gitlab-runner reads (builds_dir, cache_dir, driver)."""
    from nspawn_runner.executor import config as config_stage

    _do(lambda: out(config_stage.config(settings.load())))


@app.command(short_help="Stage: boot the job's machine.")
def prepare(default_image: str = _default_image_option()) -> None:
    """Stage: boot the job's machine from its image; returns once it is up."""
    from nspawn_runner.executor import prepare as prepare_stage

    def act() -> None:
        cancel_on_signals()
        prepare_stage.prepare(settings.load(), default_image)

    _do(act)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    short_help="Stage: run a job script in the machine.",
)
def run(args: list[str] = typer.Argument(..., metavar="[--verbose] SCRIPT STAGE",
                                         help="What gitlab-runner passes.")) -> None:
    """Stage: pipe a job script into the job's machine (the last two arguments: SCRIPT STAGE)."""
    from nspawn_runner.executor import run as run_stage

    raise typer.Exit(run_stage.main(args))


@app.command(short_help="Stage: remove the job's machine.")
def cleanup() -> None:
    """Stage: stop the job's machine and remove its writable layer (idempotent)."""
    from nspawn_runner.executor import cleanup as cleanup_stage

    _do(lambda: cleanup_stage.cleanup(settings.load()))


# Operating the host.

@app.command(short_help="Remove leftovers of crashed jobs.")
def gc(
    grace: str = typer.Option(
        "", "--grace", metavar="SECONDS", show_default=False,
        help="Spare anything younger than this (seconds, or '10m') [default: boot_timeout + "
             "60]."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Say what would be removed; remove nothing."),
    as_json: bool = _json_option(),
) -> None:
    """Remove machines, overlays, snapshots, old caches and builds that belong to no running
    job; exits with the system-failure code when something could not be removed."""
    from nspawn_runner.executor import gc as collector

    def act() -> None:
        import json

        cfg = settings.load()
        spare = _seconds(grace, "--grace") if grace else cfg.boot_timeout + 60
        report = collector.collect(cfg, spare, dry_run=dry_run)
        if as_json:
            out(json.dumps({"dry_run": dry_run, "removed": report.removed,
                            "errors": report.errors}, indent=2))
        elif dry_run:
            out("\n".join(["gc: dry run, nothing removed", *report.lines()]))
        else:
            out(f"gc: removed {len(report.removed)} item(s)")
        if report.errors:
            raise SystemFailure(f"gc: {len(report.errors)} item(s) could not be removed (see "
                                "the errors above); fix what they name and run gc again")

    _do(act)


@app.command(short_help="Print or merge the [[runners]] block.")
def toml(
    default_image: str = _default_image_option(),
    name: str = typer.Option(
        "", "--name", metavar="NAME",
        help="The runner's name in config.toml; with --merge, the block to update."),
    merge: str = typer.Option(
        "", "--merge", metavar="PATH",
        help="Complete the block in this gitlab-runner config.toml, keeping the rest."),
    add: bool = typer.Option(
        False, "--add", help="With --merge: append a new block (placeholder url and token)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="With --merge: show the change as a diff, write nothing."),
) -> None:
    """Print the [[runners]] block for gitlab-runner's config.toml, or merge it into one."""
    from nspawn_runner.gitlab import block as runner_block

    def act() -> None:
        if default_image:
            from nspawn_runner.images.names import validate_name

            validate_name(default_image)
        if not merge and (dry_run or add):
            raise SystemFailure(f"{'--dry-run' if dry_run else '--add'} needs --merge PATH")
        wanted = runner_block.Wanted.from_settings(settings.load(), default_image)
        if not merge:
            out(runner_block.render(wanted, name), end="")
            return
        from nspawn_runner.gitlab import merge as runner_merge

        result = runner_merge.merge_file(Path(merge), wanted, name, add, dry_run)
        if dry_run:
            out(result.diff(), end="")
        log.info(result.summary(dry_run))

    _do(act)


@app.command(short_help="Check that this host can run jobs.")
def check(
    no_boot: bool = typer.Option(
        False, "--no-boot", help="Do not boot each image (faster; checks only its layout)."),
    boot_timeout: str = typer.Option(
        "", "--boot-timeout", metavar="SECONDS", show_default=False,
        help="How long each test boot may take [default: the boot_timeout setting]."),
    gitlab_config: str = typer.Option(
        "", "--gitlab-config", metavar="PATH", show_default=False,
        help="Also check the blocks that call nspawn-runner in this gitlab-runner config.toml "
             f"[default: {GITLAB_CONFIG} when it exists]."),
    as_json: bool = _json_option(),
) -> None:
    """Check that this host can run jobs; exits with the system-failure code if it cannot."""
    from nspawn_runner import check as host_check

    def act() -> None:
        cancel_on_signals()  # a test boot in progress is torn down on SIGTERM
        timeout = _seconds(boot_timeout, "--boot-timeout") if boot_timeout else 0
        given = Path(gitlab_config) if gitlab_config else None
        found = GITLAB_CONFIG if given is None and GITLAB_CONFIG.exists() else None
        report = host_check.run(host_check.Host(), settings.config_path(), boot=not no_boot,
                                boot_timeout=timeout, gitlab_config=given or found,
                                gitlab_config_given=given is not None)
        out(report.to_json() if as_json else report.render(log.colour(sys.stdout)), end="")
        report.raise_for_failures()

    _do(act)


@app.command("settings", short_help="Show the effective settings.")
def show_settings(as_json: bool = _json_option()) -> None:
    """Print the effective settings and where each value came from."""

    def act() -> None:
        import json

        path = settings.config_path()
        cfg = settings.load(path)
        out(json.dumps(settings.effective(cfg, path), indent=2) if as_json
            else settings.show(cfg, path), end="\n" if as_json else "")

    _do(act)


# Images (docs/images.md): image files, and versions swapped in atomically under <root>/images.

def _image_argument() -> Any:
    return typer.Argument(..., metavar="NAME", help="Image name: <root>/images/NAME, and its "
                                                    "file NAME.toml in images_config_dir.")


def _override(metavar: str, help_text: str) -> Any:
    return typer.Option("", metavar=metavar, show_default=False,
                        help=help_text + " Overrides the image file.")


def _verify_option() -> Any:
    return typer.Option("auto", "--verify", metavar="auto|signature|checksum|no",
                        help=VERIFY_HELP)


KEYRING_HELP = "The public keys a signature may come from (gpg --export)."


@app.command("chroot-create", short_help="Build an image from its file.")
def chroot_create(
    name: str = _image_argument(),
    bootstrap: str = _override("TOOL", "mmdebstrap, debootstrap or command."),
    suite: str = _override("SUITE", "Suite or codename, e.g. bookworm."),
    mirror: str = _override("URL", "Debian mirror URL."),
    architecture: str = _override("ARCH", "Architecture, e.g. i386."),
    variant: str = _override("VARIANT", "Bootstrap variant, e.g. minbase."),
    include: list[str] = typer.Option(
        None, "--include", metavar="PACKAGE",
        help="One more package (repeatable), added to the file's packages."),
    save: bool = typer.Option(False, "--save", help="Write the options into the image file."),
) -> None:
    """Build image NAME aside from its file, then put it in place (replacing the old one)."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands, spec

    def act() -> None:
        cancel_on_signals()  # the half-made image is removed on SIGTERM
        cfg = settings.load()
        given = {"bootstrap": bootstrap, "suite": suite, "mirror": mirror,
                 "architecture": architecture, "variant": variant}
        overrides = spec.overrides(cfg, name, include or [],
                                   **{k: v or None for k, v in given.items()})
        commands.create(cfg, name, state.image_uses, overrides, save)
        _recycle_pools(cfg)

    _do(act)


@app.command("chroot-login", context_settings={"ignore_unknown_options": True},
             short_help="Root shell in a copy of an image.")
def chroot_login(
    name: str = _image_argument(),
    command: list[str] = typer.Argument(None, metavar="[-- COMMAND...]",
                                        help="A command instead of the shell."),
) -> None:
    """A root shell in a copy of image NAME; exit 0 to make it the image, non-zero to drop it."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    def act() -> None:
        cancel_on_signals()
        cfg = settings.load()
        commands.login(cfg, name, command or [], state.image_uses)
        _recycle_pools(cfg)

    _do(act)


def _report(outcomes: Sequence[Any], as_json: bool, what: str) -> None:
    import json

    from nspawn_runner.images import commands

    if as_json:
        out(json.dumps(commands.outcomes_json(outcomes), indent=2))
    else:
        out(commands.maintenance_report(outcomes, log.colour(sys.stdout)), end="")
    commands.check_outcomes(outcomes, what)


@app.command("chroot-maintenance", short_help="Bring every image up to date.")
def chroot_maintenance(
    names: list[str] = typer.Argument(None, metavar="[NAME...]",
                                      help="Images to maintain [default: every image file]."),
    as_json: bool = _json_option(),
) -> None:
    """Create missing images, recreate old ones, re-run provisioning on the others."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    def act() -> None:
        cancel_on_signals()
        cfg = settings.load()
        outcomes = commands.maintenance(cfg, names or [], state.image_uses)
        _recycle_pools(cfg)
        _report(outcomes, as_json, "maintenance")

    _do(act)


@app.command("chroot-list", short_help="List images and their use.")
def chroot_list(as_json: bool = _json_option()) -> None:
    """List images: size, creation and maintenance time, backend, jobs using them now."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    def act() -> None:
        import json

        rows = commands.list_images(settings.load(), state.image_uses)
        out(json.dumps(rows, indent=2) if as_json else commands.list_report(rows), end="")

    _do(act)


@app.command("chroot-remove", short_help="Remove an image.")
def chroot_remove(
    name: str = _image_argument(),
    force: bool = typer.Option(
        False, "--force", help="Even while jobs use it (they keep their version)."),
    yes: bool = typer.Option(False, "--yes", "-y",
                             help="Do not ask for confirmation (on a terminal it asks)."),
) -> None:
    """Remove image NAME; refused while jobs use it, unless --force."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    def act() -> None:
        cfg = settings.load()
        if not yes and interactive():
            commands.existing(cfg, name)
            if not typer.confirm(f"Remove image {name!r} from {cfg.images_dir}?", default=False,
                                 err=True):
                raise SystemFailure(f"image {name!r} kept: removal not confirmed (--yes "
                                    "removes without asking)")
        commands.remove(cfg, name, state.image_uses, force)

    _do(act)


@app.command("chroot-export", short_help="Write an image for other hosts.")
def chroot_export(
    name: str = _image_argument(),
    dest: Path = typer.Argument(
        ..., metavar="DIR|FILE",
        help="A directory (gets NAME.tar.xz) or a file NAME.tar.xz, NAME.tar.gz or NAME.tar."),
    sign: bool = typer.Option(False, "--sign", help="Sign SHA256SUMS with gpg."),
    key: str = typer.Option("", "--sign-key", metavar="KEYID",
                            help="The gpg key to sign with (implies --sign)."),
) -> None:
    """Write image NAME as a tarball systemd's importer reads, with SHA256SUMS beside it."""
    from nspawn_runner.images import commands

    _do(lambda: commands.export(settings.load(), name, dest, sign or bool(key), key))


@app.command("chroot-import", short_help="Make an image from a tarball.")
def chroot_import(
    name: str = _image_argument(),
    source: str = typer.Argument(..., metavar="FILE|URL", help="A tarball: a path or a URL."),
    verify: str = _verify_option(),
    keyring: Path = typer.Option(KEYRING, "--keyring", metavar="FILE", help=KEYRING_HELP),
) -> None:
    """Make image NAME from a tarball, verified and checked before it replaces anything."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    def act() -> None:
        cancel_on_signals()
        cfg = settings.load()
        commands.import_(cfg, name, source, state.image_uses, verify, keyring)
        _recycle_pools(cfg)

    _do(act)


@app.command("exec", short_help="Run a .gitlab-ci.yml job here, through the real stages.")
def exec_(
    job: str = typer.Argument("", metavar="[JOB]", show_default=False,
                              help="The job's name (see --list)."),
    list_jobs: bool = typer.Option(False, "--list", help="List the jobs and exit."),
    preview: bool = typer.Option(
        False, "--preview",
        help="Print JOB as resolved (extends, references, variables); run nothing."),
    var: list[str] = typer.Option(
        None, "--var", metavar="KEY=VALUE", help="A pipeline variable; it overrides the file's."),
    image: str = typer.Option("", "--image", metavar="NAME", show_default=False,
                              help="Run on this image instead."),
    directory: str = typer.Option(".", "-C", "--directory", metavar="DIR",
                                  help="The project's checkout."),
    file: str = typer.Option("", "--file", metavar="PATH", show_default=False,
                             help="The CI file [default: .gitlab-ci.yml of the project]."),
    tracked_only: bool = typer.Option(
        False, "--tracked-only", help="Only committed content, not the working tree."),
    force: bool = typer.Option(
        False, "--force", help="Run JOB even if its rules leave it out of this pipeline."),
    keep: bool = typer.Option(False, "--keep", help="Leave the machine running after the job."),
    shell_on_failure: bool = typer.Option(
        False, "--shell-on-failure", help="A shell in the machine when a step fails."),
    artifacts_dir: str = typer.Option(
        "", "--artifacts-dir", metavar="DIR", show_default=False,
        help="Artifacts go here instead of the working tree."),
) -> None:
    """Run JOB of .gitlab-ci.yml in the machine a real job gets, through config, prepare,
    run and cleanup. Exit status: 0 passed (or allowed to fail), the job's code, 124 timed out,
    125 exec could not run it."""
    from nspawn_runner.local import exec as local_exec

    opts = local_exec.Options(
        job=job or None, directory=Path(directory), file=Path(file) if file else None,
        variables=tuple(var or ()), image=image or None, tracked_only=tracked_only,
        force=force, keep=keep, shell_on_failure=shell_on_failure,
        artifacts_dir=Path(artifacts_dir) if artifacts_dir else None, list_jobs=list_jobs,
        preview=preview)
    raise typer.Exit(local_exec.run(opts))


@app.command(short_help="A command in a build image, as yourself.",
             context_settings={"ignore_unknown_options": True})
def shell(
    image: str = typer.Argument(..., metavar="IMAGE", help="The image: <root>/images/IMAGE."),
    command: list[str] = typer.Argument(
        None, metavar="[-- COMMAND...]",
        help="The command and its arguments [default: a login shell]."),
    bind: list[str] = typer.Option(None, "--bind", metavar="PATH[:DEST]",
                                   help="Bind a path you may read and write."),
    bind_ro: list[str] = typer.Option(None, "--bind-ro", metavar="PATH[:DEST]",
                                      help="Bind a path you may read, read-only."),
    network: str = typer.Option(
        "", "--network", metavar="host|private|none", show_default=False,
        help="host, private (a veth link) or none (loopback only) [default: from the "
             "settings' network]."),
    keep: bool = typer.Option(False, "--keep", help="Keep the writable layer and say where it is."),
) -> None:
    """Run COMMAND (or a login shell) in a throwaway copy of IMAGE as you: your uid, groups
    and home; the current directory when it is under your home. Its exit status is ours (125:
    it could not run). Safe to allow through sudo (examples/sudoers.d/nspawn-runner)."""
    from nspawn_runner.local import shell as local_shell

    opts = local_shell.Options(image=image, command=tuple(command or ()),
                               binds=tuple(bind or ()), binds_ro=tuple(bind_ro or ()),
                               network=network or None, keep=keep)
    raise typer.Exit(local_shell.main(opts))


@app.command("chroot-sync", short_help="Follow the images another host exports.")
def chroot_sync(
    url: str = typer.Argument(..., metavar="URL",
                              help="A directory of exported images (its SHA256SUMS lists them)."),
    names: list[str] = typer.Argument(None, metavar="[NAME...]",
                                      help="Only these images [default: every image listed]."),
    verify: str = _verify_option(),
    keyring: Path = typer.Option(KEYRING, "--keyring", metavar="FILE", help=KEYRING_HELP),
    as_json: bool = _json_option(),
) -> None:
    """Import every image the index at URL lists whose tarball changed; swap each in atomically."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    def act() -> None:
        cancel_on_signals()
        cfg = settings.load()
        outcomes = commands.sync(cfg, url, state.image_uses, names or [], verify, keyring)
        _recycle_pools(cfg)
        _report(outcomes, as_json, "sync")

    _do(act)


def _pool_spec_of(cfg: settings.Settings) -> Any:
    from nspawn_runner.executor import pool, prepare

    return lambda image: prepare.boot_spec(cfg, pool.template_job(image))


def _recycle_pools(cfg: settings.Settings) -> None:
    """A new version of an image is in place: its pool machines of the old one go, and new
    ones boot for the runner they were kept for."""
    from nspawn_runner.executor import pool

    pool.recycle(cfg, _pool_spec_of(cfg))


# The warm pool (docs/performance.md): machines booted ahead of their jobs.
pool_app = typer.Typer(help="The warm pool: machines booted ahead of their jobs (pool_size).",
                       no_args_is_help=True,
                       context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(pool_app, name="pool", short_help="Fill, list or drain the warm pool.")


@pool_app.command("fill", short_help="Boot what the pools lack.")
def pool_fill(
    runner_unit: str = typer.Option(
        "", "--runner-unit", metavar="UNIT", show_default=False,
        help="Keep the pool for this unit's main process, e.g. gitlab-runner.service "
             "[default: the gitlab-runner that called this command]."),
) -> None:
    """Boot, in the background, the machines each image's pool lacks (pool_size)."""
    from nspawn_runner.executor import pool, state
    from nspawn_runner.images import names

    def act() -> None:
        cfg = settings.load()
        owner = pool.runner_of_unit(runner_unit) if runner_unit else state.owner_identity()
        booted = pool.fill(cfg, _pool_spec_of(cfg), owner, names.available(cfg))
        out(f"pool: booting {len(booted)} machine(s)")

    _do(act)


@pool_app.command("list", short_help="List the pool machines.")
def pool_list(as_json: bool = _json_option()) -> None:
    """List pool machines: image, state (booting, ready, serving), age, runner alive."""
    from nspawn_runner import table
    from nspawn_runner.executor import pool

    def act() -> None:
        import json

        rows = pool.listing()
        if as_json:
            out(json.dumps(rows, indent=2))
            return
        lines = [("MACHINE", "IMAGE", "STATE", "AGE", "RUNNER", "VERSION")]
        lines += [(str(r["machine"]), str(r["image"]), str(r["state"]), f"{r['age']}s",
                   "alive" if r["runner_alive"] else "gone",
                   "current" if r["current_version"] else "old") for r in rows]
        out(table.render(lines), end="")

    _do(act)


@pool_app.command("drain", short_help="Stop every idle pool machine.")
def pool_drain() -> None:
    """Stop every pool machine that serves no job (they boot again with the next job)."""
    from nspawn_runner.executor import pool

    def act() -> None:
        out(f"pool: stopped {len(pool.drain(settings.load()))} machine(s)")

    _do(act)


@app.command("manpage", hidden=True)
def manpage() -> None:
    """Print the man page nspawn-runner(1), made from this command line."""
    from nspawn_runner import manual

    out(manual.render(typer.main.get_command(app)), end="")
