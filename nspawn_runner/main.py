"""Console entry point.

Everything but the `run` stage goes through the typer app in cli.py. `run` is called for every
step of every job, so it bypasses typer (about 60 ms of imports) and tomlkit: executor/run.py needs
neither. `nspawn-runner run --help` still goes to typer."""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["run"] and not {"--help", "-h"} & set(args):
        from nspawn_runner.executor.run import main as run_main

        sys.exit(run_main(args[1:]))
    from nspawn_runner.cli import app

    app(prog_name="nspawn-runner")
