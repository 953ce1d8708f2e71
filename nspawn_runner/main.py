"""Console entry point.

The four stage commands (config, prepare, run, cleanup) are called by gitlab-runner for every
job, `run` for every step of it: they are dispatched here, before typer is imported (typer with
its dependencies costs about 100 ms of imports on a small machine). Only the stage's own modules
load, all of them stdlib only (tests/unit/test_layers.py keeps it so). Everything else, `--help`
and any argument the fast path does not know go to the typer app in cli.py, which then says
what is wrong with them."""

from __future__ import annotations

import sys

STAGES = ("config", "prepare", "run", "cleanup")
_GLOBAL = ("-v", "--verbose", "--debug")


def _config() -> None:
    from nspawn_runner.executor import config

    output = config.cached()
    if output is None:
        from nspawn_runner import settings

        output = config.config(settings.load())
        config.remember(output)
    print(output)


def _prepare(default_image: str) -> None:
    from nspawn_runner import settings
    from nspawn_runner.errors import cancel_on_signals
    from nspawn_runner.executor import prepare

    cancel_on_signals()
    prepare.prepare(settings.load(), default_image)


def _cleanup() -> None:
    from nspawn_runner import settings
    from nspawn_runner.executor import cleanup

    cleanup.cleanup(settings.load())


def _default_image(args: list[str]) -> str | None:
    """prepare's only option, `--default-image NAME` or `--default-image=NAME`; None when
    `args` hold anything else (typer then reports it)."""
    if not args:
        return ""
    if len(args) == 1 and args[0].startswith("--default-image="):
        return args[0].split("=", 1)[1]
    if len(args) == 2 and args[0] == "--default-image":
        return args[1]
    return None


def stage(args: list[str]) -> int | None:
    """Run a stage command without typer: its exit code, or None if `args` are not a stage
    call the fast path understands."""
    if {"--help", "-h"} & set(args):
        return None
    verbose = False
    while args and args[0] in _GLOBAL:
        verbose, args = True, args[1:]
    if not args or args[0] not in STAGES:
        return None
    command, rest = args[0], args[1:]
    if command == "run":
        from nspawn_runner import log
        from nspawn_runner.executor.run import main as run_main

        if verbose:
            log.set_verbose(True)
        return run_main(rest)
    default_image = _default_image(rest) if command == "prepare" else "" if not rest else None
    if default_image is None:
        return None
    from nspawn_runner import log
    from nspawn_runner.errors import finish

    if verbose:
        log.set_verbose(True)
    try:
        if command == "config":
            _config()
        elif command == "prepare":
            _prepare(default_image)
        else:
            _cleanup()
    except BaseException as e:  # every outcome goes through the one mapping
        return finish(e)
    return finish(None)


def main() -> None:
    args = sys.argv[1:]
    while args[:1] and args[0] in _GLOBAL:
        args = args[1:]
    if args[:1] == ["cleanup"]:
        # Before anything is imported: gitlab-runner's SIGTERM at cleanup_exec_timeout must not
        # kill a cleanup that has not even started (executor/cleanup.py says why).
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = stage(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from nspawn_runner.cli import app

    app(prog_name="nspawn-runner")
