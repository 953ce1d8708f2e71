"""The `[[runners]]` block for gitlab-runner's config.toml."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import tomlkit
from tomlkit.items import Table

from nspawn_runner.settings import Settings

# gitlab-runner waits this long after SIGTERM before SIGKILL (its default is 600 s): the run
# stage stops a cancelled step within 10 s, so a long wait only delays cancellation.
GRACEFUL_KILL_TIMEOUT = 30
FORCE_KILL_TIMEOUT = 10


def executable() -> list[str]:
    """How gitlab-runner should call this installation, as an absolute path."""
    argv0 = sys.argv[0]
    if Path(argv0).name == "__main__.py" or not argv0:
        return [sys.executable, "-m", "nspawn_runner"]
    found = shutil.which(argv0) if os.sep not in argv0 else argv0
    return [os.path.abspath(found or argv0)]


def runner_table(cfg: Settings, default_image: str = "", name: str = "",
                 exe: list[str] | None = None) -> Table:
    exe = exe or executable()
    prog, pre = exe[0], exe[1:]
    prepare_args = [*pre, "prepare", *(["--default-image", default_image] if default_image else [])]
    custom = tomlkit.table()
    custom.add("config_exec", prog)
    custom.add("config_args", [*pre, "config"])
    custom.add("config_exec_timeout", 60)
    custom.add("prepare_exec", prog)
    custom.add("prepare_args", prepare_args)
    # Above boot_timeout, so a slow boot is reported by the driver, not killed by the runner.
    custom.add("prepare_exec_timeout", cfg.boot_timeout + 60)
    custom.add("run_exec", prog)
    custom.add("run_args", [*pre, "run"])
    custom.add("cleanup_exec", prog)
    custom.add("cleanup_args", [*pre, "cleanup"])
    custom.add("cleanup_exec_timeout", cfg.stop_timeout + 60)
    custom.add("graceful_kill_timeout", GRACEFUL_KILL_TIMEOUT)
    custom.add("force_kill_timeout", FORCE_KILL_TIMEOUT)

    runner = tomlkit.table()
    runner.add("name", name or f"nspawn-runner on {socket.gethostname()}")
    runner.add("url", "https://gitlab.example.com/")
    runner["url"].comment("your GitLab instance")
    runner.add("token", "REPLACE-WITH-THE-RUNNER-AUTHENTICATION-TOKEN")
    runner["token"].comment("from `gitlab-runner register` or the GitLab UI")
    runner.add("executor", "custom")
    runner.add("builds_dir", cfg.builds_dir)
    runner.add("cache_dir", cfg.cache_dir)
    runner.add("custom", custom)
    return runner


def render(cfg: Settings, default_image: str = "", name: str = "",
           exe: list[str] | None = None) -> str:
    doc = tomlkit.document()
    runners = tomlkit.aot()
    runners.append(runner_table(cfg, default_image, name, exe))
    doc.add("runners", runners)
    return tomlkit.dumps(doc)
