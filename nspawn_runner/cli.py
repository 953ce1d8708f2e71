"""The command line. Only parses arguments and maps outcomes to exit codes (main.finish); the
work happens in the modules it calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from nspawn_runner import log, settings
from nspawn_runner.main import finish

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
) -> None:
    if verbose:
        log.set_verbose(True)


@app.command()
def config() -> None:
    """Stage: print the JSON gitlab-runner reads (builds_dir, cache_dir, driver)."""
    from nspawn_runner import stages

    def act() -> None:
        out = stages.config(settings.load())
        print(out)

    _do(act)


@app.command()
def prepare(default_image: DefaultImage = "") -> None:
    """Stage: boot the job's machine from its image; returns once it is up."""
    from nspawn_runner import stages, state

    def act() -> None:
        state.cancel_on_signals()
        stages.prepare(settings.load(), default_image)

    _do(act)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run(
    args: Annotated[list[str], typer.Argument(help="[--verbose] SCRIPT STAGE", metavar="ARGS")],
) -> None:
    """Stage: pipe a job script into the job's machine (the last two arguments: SCRIPT STAGE)."""
    from nspawn_runner import run_stage

    raise typer.Exit(run_stage.main(args))


@app.command()
def cleanup() -> None:
    """Stage: stop the job's machine and remove its writable layer (idempotent)."""
    from nspawn_runner import stages

    _do(lambda: stages.cleanup(settings.load()))


@app.command()
def toml(
    default_image: DefaultImage = "",
    name: Annotated[str, typer.Option(help="The runner's name in config.toml.")] = "",
) -> None:
    """Print the [[runners]] block for gitlab-runner's config.toml."""
    from nspawn_runner import toml_block

    def act() -> None:
        if default_image:
            from nspawn_runner.images import validate_name

            validate_name(default_image)
        print(toml_block.render(settings.load(), default_image, name), end="")

    _do(act)
