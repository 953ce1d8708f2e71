"""Exit codes: 0, BUILD_FAILURE_EXIT_CODE or SYSTEM_FAILURE_EXIT_CODE, never anything else."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nspawn_runner import layout
from nspawn_runner.cli import app
from nspawn_runner.errors import BuildFailure, Cancelled, CommandError, SystemFailure, finish
from nspawn_runner.executor import run as run_stage


@pytest.mark.parametrize(
    ("error", "code"),
    [(None, 0), (BuildFailure(42), 1), (SystemFailure("x"), 2), (Cancelled("x"), 2),
     (CommandError(["false"], 1, "boom"), 2), (ValueError("bug"), 2), (KeyboardInterrupt(), 2),
     (SystemExit(0), 0)],
)
def test_finish(error: BaseException | None, code: int) -> None:
    assert finish(error) == code


def test_protocol_codes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILD_FAILURE_EXIT_CODE", "11")
    monkeypatch.setenv("SYSTEM_FAILURE_EXIT_CODE", "12")
    assert finish(BuildFailure(3)) == 11
    assert finish(SystemFailure("x")) == 12


def test_command_error_message() -> None:
    e = CommandError(["git", "clone", "https://u:secret@h/x"], 128, "warn\nfatal: nope\n")
    assert "fatal: nope" in str(e) and "128" in str(e)
    assert "secret" not in str(e)


def test_run_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_stage.main(["only-one"]) == 2
    assert run_stage.main(["--bogus", "s", "stage"]) == 2
    assert "usage" in capsys.readouterr().err


def test_run_without_prepare_is_a_system_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(layout, "RUNTIME_DIR", tmp_path)
    monkeypatch.setattr("nspawn_runner.runtime.RUNTIME_DIR", str(tmp_path))
    (tmp_path / "r.json").write_text(json.dumps({"id": 5}))
    monkeypatch.setenv("JOB_RESPONSE_FILE", str(tmp_path / "r.json"))
    script = tmp_path / "script"
    script.write_text("exit 0\n")
    # run_args come first; the script and stage are the last two arguments.
    assert run_stage.main(["--verbose", str(script), "build_script"]) == 2
    assert "was not prepared" in capsys.readouterr().err


def test_cli_help_lists_every_stage() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("config", "prepare", "run", "cleanup", "toml"):
        assert command in result.output
    commands = result.output.split("Commands:")[1]
    assert "..." not in commands  # every command has a whole one-line description


def test_config_prints_only_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text('builds_dir = "/b"\ncache_dir = "/c"\nbogus = 1\n')
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["builds_dir"] == "/b" and data["cache_dir"] == "/c"
    assert data["builds_dir_is_shared"] is False
    assert data["driver"]["name"] == "nspawn-runner"


def test_bad_settings_are_a_system_failure(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text("boot_timeout = -1\n")
    for stage in (["config"], ["prepare"], ["cleanup"]):
        result = CliRunner().invoke(app, stage)
        assert result.exit_code == 2, stage
        assert "boot_timeout" in result.output
    assert os.environ["NSPAWN_RUNNER_CONFIG"].endswith("c.toml")


def test_broken_pipe_is_not_an_error() -> None:
    import subprocess
    import sys

    # A reader that went away (`nspawn-runner settings | head`): exit 0, no traceback, and the
    # interpreter's final flush must not fail either (it writes into a closed pipe here).
    code = ("import sys; from nspawn_runner.errors import finish; print('x' * 100000); "
            "sys.exit(finish(BrokenPipeError()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""
