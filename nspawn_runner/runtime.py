"""The paths a running job's stage calls need, as plain strings: the run stage's part of
layout.py, which re-exports them. pathlib (with the urllib.parse and fnmatch it imports) cost
every run and config call 3 to 6 ms; these are all the run stage needs.

    DEFAULT_CONFIG              the settings file, unless NSPAWN_RUNNER_CONFIG names another
    RUNTIME_DIR/MACHINE.json    what prepare left for run and cleanup (executor/state.py)
    RUNTIME_DIR.config/HASH     the config stage's kept output (executor/config.py)
    RESULTS_INSIDE              inside every machine: each step's exit status (a tmpfs)"""

from __future__ import annotations

import os

DEFAULT_CONFIG = "/etc/nspawn-runner/config.toml"
RUNTIME_DIR = os.environ.get("NSPAWN_RUNNER_RUNTIME_DIR", "/run/nspawn-runner")

# Inside every machine.
RESULTS_INSIDE = "/run/nspawn-runner"  # a tmpfs of the machine's: each step's exit status
RESULTS_TMPFS = "mode=0755,size=1m"  # its mount options: a job can fill 1 MiB of it at most
GITLAB_RUNNER_INSIDE = "/usr/local/bin/gitlab-runner"
SHELLS = {"bash": "/bin/bash", "sh": "/bin/sh"}  # the `shell` setting: the path inside


def state_file(machine: str) -> str:
    return f"{RUNTIME_DIR}/{machine}.json"


def config_cache() -> str:
    """Where the config stage keeps its output: beside the runtime directory, which holds only
    what machines leave."""
    return RUNTIME_DIR.rstrip("/") + ".config"
