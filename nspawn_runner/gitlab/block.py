"""The `[[runners]]` block for gitlab-runner's config.toml: what the driver needs in it
(`Wanted`), and the block printed by `nspawn-runner toml`."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import tomlkit
from tomlkit.items import Table

from nspawn_runner.settings import Settings

STAGES = ("config", "prepare", "run", "cleanup")
# gitlab-runner waits this long after SIGTERM before SIGKILL (its default is 600 s): the run
# stage stops a cancelled step within 10 s, so a long wait only delays cancellation.
GRACEFUL_KILL_TIMEOUT = 30
FORCE_KILL_TIMEOUT = 10
CONFIG_EXEC_TIMEOUT = 60
# Seconds above boot_timeout (stop_timeout) that prepare (cleanup) may take: finding the image,
# making the writable layer, the state file.
STAGE_MARGIN = 60
# What the run stage needs between SIGTERM and SIGKILL to stop a cancelled step.
RUN_STOP_SECONDS = 10
# Also an nspawn-runner installation when run through `python -m nspawn_runner`.
MODULE = "nspawn_runner"
PROGRAM = "nspawn-runner"


def executable() -> list[str]:
    """How gitlab-runner should call this installation, as an absolute path. Symlinks are
    kept (`/usr/local/bin/nspawn-runner`, not the venv's file it points to)."""
    argv0 = sys.argv[0]
    if Path(argv0).name == "__main__.py" or not argv0:
        return [sys.executable, "-m", MODULE]
    found = shutil.which(argv0) if os.sep not in argv0 else argv0
    return [os.path.abspath(found or argv0)]


@dataclass(frozen=True)
class Timeout:
    """A `*_timeout` key: the value the driver writes, the least it accepts from an admin
    (a larger one is kept), and why."""

    key: str
    value: int
    floor: int
    why: str


@dataclass(frozen=True)
class Wanted:
    """What the driver needs in its [[runners]] block, made from the settings."""

    program: str
    prefix: tuple[str, ...] = ()  # ("-m", "nspawn_runner") for a `python -m` installation
    default_image: str = ""
    builds_dir: str = "/builds"
    cache_dir: str = "/cache"
    boot_timeout: int = 120
    stop_timeout: int = 30

    @classmethod
    def from_settings(cls, cfg: Settings, default_image: str = "",
                      exe: list[str] | None = None) -> Wanted:
        exe = exe or executable()
        return cls(program=exe[0], prefix=tuple(exe[1:]), default_image=default_image,
                   builds_dir=cfg.builds_dir, cache_dir=cfg.cache_dir,
                   boot_timeout=cfg.boot_timeout, stop_timeout=cfg.stop_timeout)

    def options(self, stage: str) -> list[str]:
        """The stage's own options, after its name."""
        if stage == "prepare" and self.default_image:
            return ["--default-image", self.default_image]
        return []

    def args(self, stage: str) -> list[str]:
        return [*self.prefix, stage, *self.options(stage)]

    def timeouts(self) -> tuple[Timeout, ...]:
        prepare = self.boot_timeout + STAGE_MARGIN
        cleanup = self.stop_timeout + STAGE_MARGIN
        return (
            Timeout("config_exec_timeout", CONFIG_EXEC_TIMEOUT, 1, "any time is enough"),
            Timeout("prepare_exec_timeout", prepare, prepare,
                    f"it must stay {STAGE_MARGIN} s above boot_timeout ({self.boot_timeout} s), "
                    "or gitlab-runner kills a slow boot before the driver can say why"),
            Timeout("cleanup_exec_timeout", cleanup, cleanup,
                    f"it must stay {STAGE_MARGIN} s above stop_timeout ({self.stop_timeout} s), "
                    "or gitlab-runner kills cleanup before the machine is gone"),
            Timeout("graceful_kill_timeout", GRACEFUL_KILL_TIMEOUT, RUN_STOP_SECONDS,
                    f"the run stage needs up to {RUN_STOP_SECONDS} s after SIGTERM to stop a "
                    "cancelled step inside the machine"),
            Timeout("force_kill_timeout", FORCE_KILL_TIMEOUT, 1, "any time is enough"),
        )


def is_ours(program: object, args: object) -> bool:
    """Whether a `*_exec` (with its `*_args`) calls an nspawn-runner installation."""
    if not isinstance(program, str) or not program:
        return False
    if Path(program).name == PROGRAM:
        return True
    return (Path(program).name.startswith("python") and isinstance(args, list)
            and MODULE in args)


def custom_table(wanted: Wanted) -> Table:
    custom = tomlkit.table()
    timeouts = {t.key: t.value for t in wanted.timeouts()}
    for stage in STAGES:
        custom.add(f"{stage}_exec", wanted.program)
        custom.add(f"{stage}_args", wanted.args(stage))
        if f"{stage}_exec_timeout" in timeouts:
            custom.add(f"{stage}_exec_timeout", timeouts[f"{stage}_exec_timeout"])
    custom.add("graceful_kill_timeout", timeouts["graceful_kill_timeout"])
    custom.add("force_kill_timeout", timeouts["force_kill_timeout"])
    return custom


def runner_table(wanted: Wanted, name: str = "") -> Table:
    runner = tomlkit.table()
    runner.add("name", name or default_name())
    runner.add("url", "https://gitlab.example.com/")
    runner["url"].comment("your GitLab instance")
    runner.add("token", "REPLACE-WITH-THE-RUNNER-AUTHENTICATION-TOKEN")
    runner["token"].comment("from `gitlab-runner register` or the GitLab UI")
    runner.add("executor", "custom")
    runner.add("builds_dir", wanted.builds_dir)
    runner.add("cache_dir", wanted.cache_dir)
    runner.add("custom", custom_table(wanted))
    return runner


def default_name() -> str:
    return f"nspawn-runner on {socket.gethostname()}"


def render(wanted: Wanted, name: str = "") -> str:
    doc = tomlkit.document()
    runners = tomlkit.aot()
    runners.append(runner_table(wanted, name))
    doc.add("runners", runners)
    return tomlkit.dumps(doc)
