"""`nspawn-runner check --gitlab-config PATH`: does each block of gitlab-runner's config.toml
that calls the driver work with this host's settings and images? Every finding names the key,
its value, what goes wrong with it and the fix (usually `toml --merge`)."""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

from tomlkit.items import Table

from nspawn_runner.errors import SystemFailure
from nspawn_runner.gitlab import merge
from nspawn_runner.gitlab.block import RUN_STOP_SECONDS, STAGE_MARGIN, STAGES
from nspawn_runner.settings import Settings


@dataclass(frozen=True)
class Finding:
    name: str
    status: str  # "ok", "warn" or "FAIL"
    detail: str
    fix: str = ""


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _default_image(args: object) -> str | None:
    if not isinstance(args, list):
        return None
    items = [str(a) for a in args]
    for i, arg in enumerate(items):
        if arg == "--default-image" and i + 1 < len(items):
            return items[i + 1]
        if arg.startswith("--default-image="):
            return arg.split("=", 1)[1]
    return None


def _block(runner: Table, cfg: Settings, images: Set[str], files: Set[str],
           exists: merge.Exists) -> tuple[list[str], list[str], str]:
    """(failures, warnings, the program it calls)."""
    fails: list[str] = []
    warns: list[str] = []
    if runner.get("executor") != "custom":
        fails.append(f"executor is {runner.get('executor')!r}, not 'custom'")
    custom = runner.get("custom")
    custom = custom if isinstance(custom, dict) else {}
    programs = []
    for stage in STAGES:
        program, args = custom.get(f"{stage}_exec"), custom.get(f"{stage}_args")
        if not isinstance(program, str) or not program:
            fails.append(f"no {stage}_exec: gitlab-runner skips the {stage} stage")
            continue
        programs.append(program)
        if not exists(program):
            fails.append(f"{stage}_exec {program!r} is no executable file")
        if not isinstance(args, list) or stage not in [str(a) for a in args]:
            fails.append(f"{stage}_args {args!r} does not name the stage {stage!r}")
    prepare = _int(custom.get("prepare_exec_timeout"))
    if prepare is not None and prepare <= cfg.boot_timeout:
        fails.append(f"prepare_exec_timeout {prepare} is not above boot_timeout "
                     f"{cfg.boot_timeout}: gitlab-runner kills a slow boot before the driver "
                     "can say why")
    elif prepare is not None and prepare < cfg.boot_timeout + STAGE_MARGIN:
        warns.append(f"prepare_exec_timeout {prepare} leaves less than {STAGE_MARGIN} s above "
                     f"boot_timeout {cfg.boot_timeout}")
    cleanup = _int(custom.get("cleanup_exec_timeout"))
    if cleanup is not None and cleanup <= cfg.stop_timeout:
        fails.append(f"cleanup_exec_timeout {cleanup} is not above stop_timeout "
                     f"{cfg.stop_timeout}: cleanup is killed before the machine is gone")
    graceful = _int(custom.get("graceful_kill_timeout"))
    if graceful is not None and graceful < RUN_STOP_SECONDS:
        warns.append(f"graceful_kill_timeout {graceful} is below the {RUN_STOP_SECONDS} s the "
                     "run stage needs to stop a cancelled step")
    image = _default_image(custom.get("prepare_args"))
    if image is not None and image not in images:
        fails.append(f"prepare_args name --default-image {image!r}, which is "
                     + ("not built yet (nspawn-runner chroot-create "
                        f"{image})" if image in files else "no image on this host"))
    if image is None and not cfg.default_image:
        warns.append("no --default-image in prepare_args and no default_image setting: jobs "
                     "without `image:` fail")
    for key in ("builds_dir", "cache_dir"):
        value = runner.get(key)
        if value is not None and value != getattr(cfg, key):
            warns.append(f"{key} {value!r} differs from the setting {getattr(cfg, key)!r}, "
                         "which the config stage reports and gitlab-runner uses")
    return fails, warns, ", ".join(sorted(set(programs))) or "nothing"


def verify(path: Path, cfg: Settings, images: Set[str], files: Set[str],
           exists: merge.Exists | None = None, unmerged_fails: bool = True) -> list[Finding]:
    """Findings for every block of `path` that calls nspawn-runner; `images` are the built
    images, `files` the images that have an image file. No such block is a failure, or only
    a warning without `unmerged_fails` (a host that runs other runners too)."""
    exists = exists or merge.executable_file
    label = "gitlab-runner config"
    try:
        doc = merge.read_config(path)
        runners = list(merge.runners_of(doc, path) or ())
    except SystemFailure as e:
        return [Finding(label, "FAIL", str(e), "fix the file, or give its path with "
                        "--gitlab-config PATH")]
    ours = [r for r in runners if merge.calls_us(r)]
    if not ours:
        unfinished = [r for r in runners if merge.unfinished_custom(r)]
        name = f" --name {str(unfinished[0].get('name'))!r}" if len(unfinished) == 1 else ""
        listed = ", ".join(repr(str(r.get("name", "?"))) for r in runners) or "none"
        return [Finding(label, "FAIL" if unmerged_fails else "warn",
                        f"{path}: no runner calls nspawn-runner (runners: {listed})",
                        f"nspawn-runner toml --merge {path}{name}")]
    findings = []
    for runner in ours:
        name = str(runner.get("name", "?"))
        fails, warns, program = _block(runner, cfg, images, files, exists)
        fix = f"nspawn-runner toml --merge {path} --name {name!r}"
        if fails:
            findings.append(Finding(f"runner {name}", "FAIL", "; ".join(fails + warns), fix))
        elif warns:
            findings.append(Finding(f"runner {name}", "warn", "; ".join(warns), fix))
        else:
            findings.append(Finding(f"runner {name}", "ok",
                                    f"{path}: every stage calls {program}; timeouts above "
                                    "boot_timeout and stop_timeout"))
    return findings
