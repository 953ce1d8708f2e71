"""Command-line conventions: --version, -h, global flags before or after the command, word
metavars, colour on a terminal only, --json for monitoring, NSPAWN_RUNNER_VERBOSE=0, the
chroot-remove question, a closed stdout that keeps the exit status, completion, the man page."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from nspawn_runner import __version__, check, cli, log, manual
from nspawn_runner.cli import app, hoist_global_flags
from nspawn_runner.executor import gc as collector

ROOT = Path(__file__).resolve().parents[2]
TYPE_NAMES = {"TEXT", "INTEGER", "FLOAT", "BOOLEAN", "FILENAME", "DIRECTORY", "UUID"}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Settings with a state root and an image directory of their own."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    files = tmp_path / "images.d"
    files.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'root = "{root}"\nimages_config_dir = "{files}"\n')
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(config))
    monkeypatch.delenv("NSPAWN_RUNNER_ROOT", raising=False)
    monkeypatch.setattr("nspawn_runner.layout.RUNTIME_DIR", tmp_path / "run")
    monkeypatch.setattr("nspawn_runner.runtime.RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path


def invoke(*args: str, **kw: Any) -> Any:
    return CliRunner().invoke(app, list(args), **kw)


def commands() -> dict[str, Any]:
    group = typer.main.get_command(app)
    return dict(group.commands)  # type: ignore[attr-defined]


def test_version_agrees_with_the_project() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"nspawn-runner {__version__}\n"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("args", [["-h"], ["--help"], ["check", "-h"], ["chroot-sync", "-h"]])
def test_short_and_long_help(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 0 and "Usage: " in result.stdout


@pytest.mark.parametrize(("given", "parsed"), [
    (["check", "-v", "--json"], ["-v", "check", "--json"]),
    (["chroot-list", "--debug"], ["--debug", "chroot-list"]),
    (["-v", "settings"], ["-v", "settings"]),
    (["chroot-login", "x", "--verbose", "--", "sh", "-v"],
     ["--verbose", "chroot-login", "x", "--", "sh", "-v"]),
    (["run", "--verbose", "script", "step"], ["run", "--verbose", "script", "step"]),
    (["chroot-login", "x", "-v", "sh", "-c", "ls -v", "-v"],
     ["-v", "chroot-login", "x", "sh", "-c", "ls -v", "-v"]),
    (["--", "check", "-v"], ["--", "check", "-v"]),
])
def test_global_flags_after_the_command(given: list[str], parsed: list[str]) -> None:
    assert hoist_global_flags(given) == parsed


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("flag", ["-v", "--verbose", "--debug"])
def test_verbose_after_the_command_is_verbose(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_verbose", False)
    result = invoke("chroot-list", flag)
    assert result.exit_code == 0, result.output
    assert log.verbose()


@pytest.mark.parametrize(("value", "on"), [("", False), ("0", False), ("no", False),
                                           ("false", False), ("off", False), ("1", True),
                                           ("yes", True)])
def test_verbose_from_the_environment(value: str, on: bool) -> None:
    out = subprocess.run([sys.executable, "-c", "from nspawn_runner import log; "
                          "print(log.verbose())"], capture_output=True, text=True, check=True,
                         env={**os.environ, "NSPAWN_RUNNER_VERBOSE": value}).stdout
    assert out.strip() == str(on)


def test_metavars_are_words() -> None:
    for name, command in commands().items():
        for param in command.params:
            if param.param_type_name == "option" and getattr(param, "is_flag", False):
                continue
            assert param.metavar, f"{name} {param.name}: no metavar"
            assert not TYPE_NAMES & set(re.findall(r"[A-Z]+", param.metavar)), (name, param.name)
    for command in ("toml", "check", "gc", "chroot-create", "chroot-import", "chroot-sync"):
        text = invoke(command, "--help").stdout
        assert not TYPE_NAMES & set(re.findall(r"\b[A-Z]{4,}\b", text)), (command, text)


def test_colour_only_for_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert log.colour(Tty()) and not log.colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not log.colour(Tty())
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert not log.colour(Tty())
    monkeypatch.setenv("TERM", "xterm")
    stderr = Tty()
    monkeypatch.setattr(sys, "stderr", stderr)
    log.error("broken")
    log.warn("odd")
    assert stderr.getvalue() == ("\033[1;31merror:\033[0m broken\n"
                                 "\033[1;33mwarning:\033[0m odd\n")


def test_check_table_colours_fail_and_warn_without_moving_columns() -> None:
    report = check.Report((check.Check("a", check.Status.OK, "fine"),
                           check.Check("bb", check.Status.FAIL, "broken", "fix it"),
                           check.Check("c", check.Status.WARN, "odd")))
    plain, coloured = report.render(), report.render(colour=True)
    assert re.sub(r"\033\[[0-9;]*m", "", coloured) == plain
    assert "\033[1;31mFAIL\033[0m" in coloured and "\033[1;33mwarn\033[0m" in coloured
    assert "\033" not in plain


def test_gc_json(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []

    item = {"kind": "overlay", "item": "/x", "reason": "no machine uses it"}

    def collect(cfg: object, grace: float, dry_run: bool = False) -> collector.Report:
        seen.append(grace)
        return collector.Report(dry_run=dry_run, removed=[item])

    monkeypatch.setattr(collector, "collect", collect)
    result = invoke("gc", "--json", "--grace", "10m")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"dry_run": False, "removed": [item], "errors": []}
    assert seen == [600]
    bad = invoke("gc", "--grace", "soon")
    assert bad.exit_code == 2 and "--grace 'soon': expected a duration" in bad.stderr


def test_maintenance_json_and_exit_status(env: Path) -> None:
    (env / "images.d" / "broken.toml").write_text("suite = 3\n")
    result = invoke("chroot-maintenance", "--json")
    assert result.exit_code == 2
    (entry,) = json.loads(result.stdout)
    assert entry["name"] == "broken" and entry["ok"] is False
    assert "invalid value 3 for 'suite'" in entry["error"] and entry["action"] is None
    assert "maintenance failed for 1 of 1 images: broken" in result.stderr


def _image(env: Path, name: str) -> Path:
    path = env / "root" / "images" / name
    path.mkdir()
    return path


def test_remove_asks_on_a_terminal(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "interactive", lambda: True)
    image = _image(env, "keepme")
    declined = invoke("chroot-remove", "keepme", input="n\n")
    assert declined.exit_code == 2 and image.is_dir()
    assert "Remove image 'keepme'" in declined.stderr
    assert "image 'keepme' kept: removal not confirmed" in declined.stderr
    accepted = invoke("chroot-remove", "keepme", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert not image.exists()
    _image(env, "again")
    asked: list[str] = []

    def confirm(*args: object, **kw: object) -> bool:
        asked.append("?")
        return False

    monkeypatch.setattr(typer, "confirm", confirm)
    assert invoke("chroot-remove", "again", "--yes").exit_code == 0 and asked == []
    missing = invoke("chroot-remove", "absent")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr and asked == []


def test_remove_does_not_ask_without_a_terminal(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "interactive", lambda: False)
    image = _image(env, "gone")
    result = invoke("chroot-remove", "gone")
    assert result.exit_code == 0 and not image.exists() and "Remove image" not in result.stderr


def _closed_stdout(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI with a stdout whose reader went away before anything was written."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "nspawn_runner", *args], stdout=write,
                              stderr=subprocess.PIPE, env=env, timeout=60)
    finally:
        os.close(write)


def test_a_closed_stdout_keeps_the_exit_status(env: Path) -> None:
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = _closed_stdout(["settings"], environ)
    assert ok.returncode == 0, ok.stderr
    (env / "images.d" / "broken.toml").write_text("suite = 3\n")
    failed = _closed_stdout(["chroot-maintenance"], environ)
    assert failed.returncode == 2, failed.stderr
    assert b"internal error" not in failed.stderr and b"BrokenPipe" not in failed.stderr


def test_completion_script() -> None:
    result = subprocess.run([sys.executable, "-m", "nspawn_runner", "--show-completion", "bash"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SHELL": "/bin/bash"})
    if result.returncode != 0:  # typer with shellingham takes no shell name
        result = subprocess.run([sys.executable, "-m", "nspawn_runner", "--show-completion"],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "SHELL": "/bin/bash"})
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout and "_NSPAWN_RUNNER_COMPLETE" in result.stdout


def test_man_page_lists_every_command_and_option() -> None:
    result = invoke("manpage")
    assert result.exit_code == 0
    page = result.stdout
    assert page.startswith(".TH NSPAWN\\-RUNNER 1 ") and f'"nspawn\\-runner {__version__}"' in page
    for name, command in commands().items():
        if command.hidden:
            assert name not in page.replace("\\-", "-").split(".SH COMMANDS")[1].split(".SH")[0]
            continue
        assert f".SS nspawn\\-runner {name.replace('-', chr(92) + '-')}" in page, name
        for param in command.params:
            if param.param_type_name == "option":
                assert param.opts[0].replace("-", "\\-") in page, (name, param.opts)
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "ENVIRONMENT", "FILES",
                    "EXIT STATUS", "SEE ALSO"):
        assert f"\n.SH {section}\n" in page
    # No line may start with a roff control character by accident.
    assert all(not line.startswith(("'", ".")) or re.match(r"^\.(TH|SH|SS|TP)\b", line)
               for line in page.splitlines())


def test_man_page_escapes() -> None:
    assert manual.escape(".hidden -x \\y") == "\\&.hidden \\-x \\ey"
