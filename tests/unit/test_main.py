"""The entry point's fast path: which argument lists it takes itself, which it leaves to typer."""

import subprocess
import sys

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
