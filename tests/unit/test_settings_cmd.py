"""`nspawn-runner settings`: the effective settings and where each came from."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nspawn_runner import settings
from nspawn_runner.cli import app
from nspawn_runner.settings import SETTINGS


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('boot_timeout = 60\nallowed_images = ["deb*", "sid"]\n')
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(path))
    monkeypatch.setenv("NSPAWN_RUNNER_ROOT", "/srv/nr")
    return path


def test_table_shows_value_and_origin(config: Path) -> None:
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"settings file: {config}"
    assert lines[1].split() == ["KEY", "VALUE", "FROM"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == [row.name for row in SETTINGS]
    assert rows["root"].split() == ["root", '"/srv/nr"', "environment", "NSPAWN_RUNNER_ROOT"]
    assert rows["boot_timeout"].split() == ["boot_timeout", "60", str(config)]
    assert rows["allowed_images"].split() == ["allowed_images", '["deb*",', '"sid"]',
                                              str(config)]
    assert rows["backend"].split() == ["backend", '"auto"', "default"]
    assert rows["default_image"].split() == ["default_image", '""', "default"]


def test_json(config: Path) -> None:
    result = CliRunner().invoke(app, ["settings", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["file"] == str(config) and data["file_exists"] is True
    values = data["settings"]
    assert list(values) == [row.name for row in SETTINGS]
    assert values["root"] == {"value": "/srv/nr", "source": "environment",
                              "origin": "NSPAWN_RUNNER_ROOT"}
    assert values["allowed_images"] == {"value": ["deb*", "sid"], "source": "file",
                                        "origin": str(config)}
    assert values["stop_timeout"] == {"value": 30, "source": "default", "origin": "default"}


def test_absent_default_file(tmp_path: Path) -> None:
    cfg = settings.load(tmp_path / "absent.toml", environ={})
    text = settings.show(cfg, tmp_path / "absent.toml")
    assert text.startswith(f"settings file: {tmp_path}/absent.toml (absent: defaults and "
                           "environment only)\n")
    assert settings.effective(cfg, tmp_path / "absent.toml")["file_exists"] is False


def test_bad_settings_exit_with_the_system_failure_code(config: Path) -> None:
    config.write_text("boot_timeout = 0\n")
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert f"error: {config}: invalid value 0 for 'boot_timeout'" in result.stderr
