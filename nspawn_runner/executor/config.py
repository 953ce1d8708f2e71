"""The config stage: the JSON gitlab-runner reads before every job (builds_dir, cache_dir,
driver). Exactly one JSON object on stdout and nothing else (protocol section 2)."""

from __future__ import annotations

import json
import socket

from nspawn_runner import __version__
from nspawn_runner.settings import Settings


def config_output(cfg: Settings) -> dict[str, object]:
    return {
        "builds_dir": cfg.builds_dir,
        "cache_dir": cfg.cache_dir,
        # Every job has its own machine, so its builds dir is never shared with another job.
        "builds_dir_is_shared": False,
        "hostname": socket.gethostname(),
        "driver": {"name": "nspawn-runner", "version": __version__},
    }


def config(cfg: Settings) -> str:
    """The config stage's stdout: exactly one JSON object and nothing else."""
    return json.dumps(config_output(cfg))
