"""The entry point's fast path: which argument lists it takes itself, which it leaves to typer."""

import subprocess
import sys
from pathlib import Path

import pytest

from nspawn_runner import main


@pytest.mark.parametrize("args", [
    [], ["--help"], ["-h"], ["prepare", "--help"], ["run", "-h", "s", "x"], ["toml"], ["gc"],
    ["prepare", "--bogus"], ["prepare", "--default-image"], ["config", "extra"],
    ["cleanup", "--verbose"], ["--verbose"], ["--version"],
])
def test_left_to_typer(args: list[str]) -> None:
    assert main.stage(args) is None


@pytest.mark.parametrize(("args", "image"), [
    ([], ""), (["--default-image", "bookworm"], "bookworm"),
    (["--default-image=sid"], "sid"), (["--default-image", "a", "b"], None),
    (["--default-image=x", "--default-image=y"], None), (["bookworm"], None),
])
def test_default_image_option(args: list[str], image: str | None) -> None:
    assert main._default_image(args) == image


def test_run_usage_errors_come_from_the_fast_path() -> None:
    assert main.stage(["--verbose", "run", "only-one"]) == 2
    assert main.stage(["run", "--bogus", "s", "x"]) == 2


def test_stage_errors_are_system_failures() -> None:
    # No job response file and no job id: the identity check fails before anything runs.
    env = {"PATH": "/usr/bin:/bin", "NSPAWN_RUNNER_CONFIG": "/nonexistent/config.toml"}
    out = subprocess.run([sys.executable, "-c", "from nspawn_runner.main import main; main()",
                          "cleanup"], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert "NSPAWN_RUNNER_CONFIG" in out.stderr and "does not exist" in out.stderr


def test_unknown_options_get_typers_message() -> None:
    out = subprocess.run([sys.executable, "-c", "from nspawn_runner.main import main; main()",
                          "prepare", "--bogus"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "No such option: --bogus" in out.stderr


def test_config_output_is_kept_until_the_settings_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nspawn_runner import layout, settings
    from nspawn_runner.executor import config

    monkeypatch.setattr(layout, "RUNTIME_DIR", tmp_path / "run")
    monkeypatch.setattr("nspawn_runner.runtime.RUNTIME_DIR", str(tmp_path / "run"))
    path = tmp_path / "config.toml"
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(path))
    assert config._key()[1] and str(settings.config_path()) == str(path)
    path.write_text('builds_dir = "/b1"\n')
    assert config.cached() is None
    config.remember(config.config(settings.load()))
    assert '"builds_dir": "/b1"' in (config.cached() or "")
    path.write_text('builds_dir = "/b2"\n')  # another size and change time
    assert config.cached() is None
    config.remember(config.config(settings.load()))
    assert '"builds_dir": "/b2"' in (config.cached() or "")
    monkeypatch.setenv("NSPAWN_RUNNER_ROOT", "/elsewhere")
    assert config.cached() is None, "the environment is part of the key"
    monkeypatch.delenv("NSPAWN_RUNNER_CONFIG")
    assert str(settings.config_path()) == str(layout.DEFAULT_CONFIG)
    assert "/etc/nspawn-runner/config.toml" in config._key()[1]


def test_an_unwritable_runtime_dir_only_costs_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nspawn_runner import layout
    from nspawn_runner.executor import config

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(layout, "RUNTIME_DIR", tmp_path / "file" / "run")
    monkeypatch.setattr("nspawn_runner.runtime.RUNTIME_DIR", str(tmp_path / "file" / "run"))
    assert layout.config_cache() == tmp_path / "file" / "run.config"
    config.remember("{}")
    assert config.cached() is None
