"""The command line. Only parses arguments and maps outcomes to exit codes (errors.finish); the
work happens in the modules it calls."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from nspawn_runner import log, settings
from nspawn_runner.errors import SystemFailure, cancel_on_signals, finish

app = typer.Typer(
    help="GitLab Runner custom-executor driver: every CI job in its own systemd-nspawn machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DefaultImage = Annotated[
    str, typer.Option("--default-image", help="Image for jobs that name none.")
]


def _do(action: Callable[[], None]) -> None:
    try:
        action()
    except BaseException as e:  # every outcome goes through the one mapping
        raise typer.Exit(finish(e)) from None


@app.callback()
def _global(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the commands being run.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="As --verbose, plus tracebacks of internal errors.")
    ] = False,
) -> None:
    if verbose or debug:
        log.set_verbose(True)


@app.command(short_help="Stage: print the JSON gitlab-runner reads.")
def config() -> None:
    """Stage: print the JSON gitlab-runner reads (builds_dir, cache_dir, driver)."""
    from nspawn_runner.executor import config as config_stage

    def act() -> None:
        out = config_stage.config(settings.load())
        print(out)

    _do(act)


@app.command(short_help="Stage: boot the job's machine.")
def prepare(default_image: DefaultImage = "") -> None:
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
def run(
    args: Annotated[list[str], typer.Argument(help="[--verbose] SCRIPT STAGE", metavar="ARGS")],
) -> None:
    """Stage: pipe a job script into the job's machine (the last two arguments: SCRIPT STAGE)."""
    from nspawn_runner.executor import run as run_stage

    raise typer.Exit(run_stage.main(args))


@app.command(short_help="Stage: remove the job's machine.")
def cleanup() -> None:
    """Stage: stop the job's machine and remove its writable layer (idempotent)."""
    from nspawn_runner.executor import cleanup as cleanup_stage

    _do(lambda: cleanup_stage.cleanup(settings.load()))


@app.command(short_help="Remove leftovers of crashed jobs.")
def gc(
    grace: Annotated[
        int | None,
        typer.Option(help="Spare anything younger than this many seconds "
                     "[default: boot_timeout + 60]."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Say what would be removed; remove nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for monitoring).")] = False,
) -> None:
    """Remove machines, overlays, snapshots, old caches and builds that belong to no running
    job; exits with the system-failure code when something could not be removed."""
    from nspawn_runner.executor import gc as collector

    def act() -> None:
        import json

        cfg = settings.load()
        report = collector.collect(cfg, cfg.boot_timeout + 60 if grace is None else grace,
                                   dry_run=dry_run)
        if as_json:
            print(json.dumps({"dry_run": dry_run, "removed": report.removed,
                              "errors": report.errors}, indent=2))
        elif dry_run:
            print("\n".join(["gc: dry run, nothing removed", *report.lines()]))
        else:
            print(f"gc: removed {len(report.removed)} item(s)")
        if report.errors:
            raise SystemFailure(f"gc: {len(report.errors)} item(s) could not be removed (see "
                                "the errors above); fix what they name and run gc again")

    _do(act)


@app.command(short_help="Print or merge the [[runners]] block.")
def toml(
    default_image: DefaultImage = "",
    name: Annotated[str, typer.Option(
        help="The runner's name in config.toml; with --merge, the block to update.")] = "",
    merge: Annotated[Path | None, typer.Option(
        "--merge", metavar="PATH",
        help="Complete the block in this gitlab-runner config.toml, keeping the rest.",
    )] = None,
    add: Annotated[bool, typer.Option(
        "--add", help="With --merge: append a new block (placeholder url and token).")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="With --merge: show the change as a diff, write nothing.")] = False,
) -> None:
    """Print the [[runners]] block for gitlab-runner's config.toml, or merge it into one."""
    from nspawn_runner.gitlab import block as runner_block

    def act() -> None:
        if default_image:
            from nspawn_runner.images.names import validate_name

            validate_name(default_image)
        wanted = runner_block.Wanted.from_settings(settings.load(), default_image)
        if merge is None:
            if dry_run or add:
                raise SystemFailure(f"{'--dry-run' if dry_run else '--add'} needs --merge PATH")
            print(runner_block.render(wanted, name), end="")
            return
        from nspawn_runner.gitlab import merge as runner_merge

        result = runner_merge.merge_file(merge, wanted, name, add, dry_run)
        if dry_run:
            print(result.diff(), end="")
        log.info(result.summary(dry_run))

    _do(act)


@app.command(short_help="Check that this host can run jobs.")
def check(
    no_boot: Annotated[bool, typer.Option(
        "--no-boot", help="Do not boot each image (faster; checks only its layout).")] = False,
    boot_timeout: Annotated[int | None, typer.Option(
        "--boot-timeout", min=1, metavar="SECONDS",
        help="Seconds each test boot may take [default: the boot_timeout setting].",
    )] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Check that this host can run jobs; exits with the system-failure code if it cannot."""
    from nspawn_runner import check as host_check

    def act() -> None:
        cancel_on_signals()  # a test boot in progress is torn down on SIGTERM
        report = host_check.run(host_check.Host(), settings.config_path(), boot=not no_boot,
                               boot_timeout=boot_timeout or 0)
        print(report.to_json() if as_json else report.render(), end="")
        report.raise_for_failures()

    _do(act)


@app.command("settings", short_help="Show the effective settings.")
def show_settings(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print the effective settings and where each value came from."""

    def act() -> None:
        import json

        path = settings.config_path()
        cfg = settings.load(path)
        print(json.dumps(settings.effective(cfg, path), indent=2) if as_json
              else settings.show(cfg, path), end="\n" if as_json else "")

    _do(act)


# Images (docs/images.md): image files, and versions swapped in atomically under <root>/images.
ImageName = Annotated[str, typer.Argument(help="Image name: <root>/images/NAME, and its file "
                                               "NAME.toml in images_config_dir.")]


def _opt(help_text: str) -> Any:
    return typer.Option(help=help_text + " Overrides the image file.")


@app.command("chroot-create", short_help="Build an image from its file.")
def chroot_create(
    name: ImageName,
    bootstrap: Annotated[str | None, _opt("mmdebstrap, debootstrap or command.")] = None,
    suite: Annotated[str | None, _opt("Suite or codename, e.g. bookworm.")] = None,
    mirror: Annotated[str | None, _opt("Debian mirror URL.")] = None,
    architecture: Annotated[str | None, _opt("Architecture, e.g. i386.")] = None,
    variant: Annotated[str | None, _opt("Bootstrap variant, e.g. minbase.")] = None,
    include: Annotated[list[str] | None, typer.Option(
        help="One more package (repeatable), added to the file's packages.")] = None,
    save: Annotated[bool, typer.Option(
        "--save", help="Write the options into the image file.")] = False,
) -> None:
    """Build image NAME aside from its file, then put it in place (replacing the old one)."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands, spec

    def act() -> None:
        cancel_on_signals()  # the half-made image is removed on SIGTERM
        cfg = settings.load()
        overrides = spec.overrides(cfg, name, include or [], bootstrap=bootstrap,
                                        suite=suite, mirror=mirror, architecture=architecture,
                                        variant=variant)
        commands.create(cfg, name, state.image_uses, overrides, save)

    _do(act)


@app.command("chroot-login", context_settings={"ignore_unknown_options": True},
             short_help="Root shell in a copy of an image.")
def chroot_login(
    name: ImageName,
    command: Annotated[list[str] | None, typer.Argument(
        help="A command instead of the shell (after --).")] = None,
) -> None:
    """A root shell in a copy of image NAME; exit 0 to make it the image, non-zero to drop it."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    def act() -> None:
        cancel_on_signals()
        commands.login(settings.load(), name, command or [], state.image_uses)

    _do(act)


@app.command("chroot-maintenance", short_help="Bring every image up to date.")
def chroot_maintenance(
    names: Annotated[list[str] | None, typer.Argument(
        help="Images to maintain [default: every image file].")] = None,
) -> None:
    """Create missing images, recreate old ones, re-run provisioning on the others."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    def act() -> None:
        cancel_on_signals()
        outcomes = commands.maintenance(settings.load(), names or [], state.image_uses)
        print(commands.maintenance_report(outcomes), end="")
        commands.check_outcomes(outcomes)

    _do(act)


@app.command("chroot-list", short_help="List images and their use.")
def chroot_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List images: size, creation and maintenance time, backend, jobs using them now."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    def act() -> None:
        import json

        rows = commands.list_images(settings.load(), state.image_uses)
        print(json.dumps(rows, indent=2) if as_json else commands.list_report(rows), end="")

    _do(act)


@app.command("chroot-remove", short_help="Remove an image.")
def chroot_remove(
    name: ImageName,
    force: Annotated[bool, typer.Option(
        "--force", help="Even while jobs use it (they keep their version).")] = False,
) -> None:
    """Remove image NAME; refused while jobs use it, unless --force."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    _do(lambda: commands.remove(settings.load(), name, state.image_uses, force))


@app.command("chroot-export", short_help="Write an image to one tarball.")
def chroot_export(
    name: ImageName,
    file: Annotated[Path, typer.Argument(help="The tarball to write, e.g. NAME.tar.zst.")],
) -> None:
    """Write image NAME as one zstd tarball (ownership and xattrs kept)."""
    from nspawn_runner.images import commands

    _do(lambda: commands.export(settings.load(), name, file))


@app.command("chroot-import", short_help="Make an image from a tarball.")
def chroot_import(
    name: ImageName,
    source: Annotated[str, typer.Argument(help="A tarball: a path or an http(s) URL.")],
) -> None:
    """Make image NAME from a tarball, checked before it replaces anything."""
    from nspawn_runner.executor import state
    from nspawn_runner.images import commands

    def act() -> None:
        cancel_on_signals()
        commands.import_(settings.load(), name, source, state.image_uses)

    _do(act)


@app.command("exec", short_help="Run a .gitlab-ci.yml job here, through the real stages.")
def exec_(
    job: Annotated[str | None, typer.Argument(help="The job's name (see --list).")] = None,
    list_jobs: Annotated[bool, typer.Option("--list", help="List the jobs and exit.")] = False,
    preview: Annotated[bool, typer.Option(
        "--preview", help="Print JOB as resolved (extends, references, variables); run "
        "nothing.")] = False,
    var: Annotated[list[str] | None, typer.Option(
        "--var", metavar="KEY=VALUE", help="A pipeline variable; it overrides the file's.")
    ] = None,
    image: Annotated[str | None, typer.Option(help="Run on this image instead.")] = None,
    directory: Annotated[Path | None, typer.Option(
        "-C", "--directory", help="The project's checkout [default: here].")] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", help="The CI file [default: .gitlab-ci.yml of the project].")] = None,
    tracked_only: Annotated[bool, typer.Option(
        "--tracked-only", help="Only committed content, not the working tree.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Run JOB even if its rules leave it out of this pipeline.")] = False,
    keep: Annotated[bool, typer.Option(
        "--keep", help="Leave the machine running after the job.")] = False,
    shell_on_failure: Annotated[bool, typer.Option(
        "--shell-on-failure", help="A shell in the machine when a step fails.")] = False,
    artifacts_dir: Annotated[Path | None, typer.Option(
        "--artifacts-dir", help="Artifacts go here instead of the working tree.")] = None,
) -> None:
    """Run JOB of .gitlab-ci.yml in the machine a real job gets, through config, prepare,
    run and cleanup. Exit status: 0 passed (or allowed to fail), the job's code, 124 timed out,
    125 exec could not run it."""
    from nspawn_runner.local import exec as local_exec

    opts = local_exec.Options(
        job=job, directory=directory or Path("."), file=file, variables=tuple(var or ()),
        image=image, tracked_only=tracked_only, force=force, keep=keep,
        shell_on_failure=shell_on_failure, artifacts_dir=artifacts_dir, list_jobs=list_jobs,
        preview=preview)
    raise typer.Exit(local_exec.run(opts))


@app.command(short_help="A command in a build image, as yourself.")
def shell(
    image: ImageName,
    command: Annotated[list[str] | None, typer.Argument(
        help="After --: the command and its arguments [default: a login shell].",
        metavar="[-- COMMAND...]")] = None,
    bind: Annotated[list[str] | None, typer.Option(
        "--bind", metavar="PATH[:DEST]", help="Bind a path you may read and write.")] = None,
    bind_ro: Annotated[list[str] | None, typer.Option(
        "--bind-ro", metavar="PATH[:DEST]", help="Bind a path you may read, read-only.")] = None,
    network: Annotated[str | None, typer.Option(
        help="host, private (a veth link) or none (loopback only) [default: from the "
        "settings' network].")] = None,
    keep: Annotated[bool, typer.Option(
        "--keep", help="Keep the writable layer and say where it is.")] = False,
) -> None:
    """Run COMMAND (or a login shell) in a throwaway copy of IMAGE as you: your uid, groups
    and home; the current directory when it is under your home. Its exit status is ours. Safe
    to allow through sudo (examples/sudoers.d/nspawn-runner)."""
    from nspawn_runner.local import shell as local_shell

    opts = local_shell.Options(image=image, command=tuple(command or ()),
                               binds=tuple(bind or ()), binds_ro=tuple(bind_ro or ()),
                               network=network, keep=keep)
    code = 0

    def act() -> None:
        nonlocal code
        code = local_shell.run(opts)

    _do(act)
    raise typer.Exit(code)
