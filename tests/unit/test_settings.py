import dataclasses
from pathlib import Path

import pytest

from nspawn_runner import settings
from nspawn_runner.settings import SETTINGS, Settings, SettingsError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_table_and_dataclass_agree() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)} - {"origins"}
    assert {row.name for row in SETTINGS} == fields


def test_missing_default_file_gives_defaults(tmp_path: Path) -> None:
    cfg = settings.load(tmp_path / "absent.toml", environ={})
    assert cfg == Settings()
    assert cfg.origins["root"] == "default"


def test_missing_explicit_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(SettingsError, match="absent.toml.*NSPAWN_RUNNER_CONFIG"):
        settings.load()


def test_values_and_origins(tmp_path: Path) -> None:
    path = write(tmp_path, 'root = "/srv/nr"\nallowed_images = ["deb*"]\nboot_timeout = 30\n')
    cfg = settings.load(path, environ={})
    assert cfg.root == Path("/srv/nr")
    assert cfg.allowed_images == ("deb*",)
    assert cfg.boot_timeout == 30
    assert cfg.origins["root"] == str(path)
    assert cfg.images_dir == Path("/srv/nr/images")


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'root = "/srv/nr"\n')
    cfg = settings.load(path, environ={"NSPAWN_RUNNER_ROOT": "/other"})
    assert cfg.root == Path("/other")
    assert cfg.origins["root"] == "NSPAWN_RUNNER_ROOT"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('boot_timeout = "ten"', "'ten'.*boot_timeout.*whole number of seconds"),
        ("boot_timeout = 0", "boot_timeout.*greater than 0"),
        ("boot_timeout = true", "boot_timeout.*whole number"),
        ('root = "relative"', "root.*absolute"),
        ('backend = "zfs"', "zfs.*backend.*one of auto, btrfs, overlay, volatile"),
        ('cache_dir = "/"', "cache_dir"),
        ('builds_dir = "/a/../b"', "builds_dir"),
        ("allowed_images = [1]", "allowed_images.*list of strings"),
    ],
)
def test_wrong_types_name_file_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(SettingsError, match=message) as info:
        settings.load(path, environ={})
    assert str(path) in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "root = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        settings.load(path, environ={})


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        settings.load(tmp_path, environ={})  # a directory: read_text fails


def test_unknown_key_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, 'boot_timeot = 3\n')
    assert settings.load(path, environ={}) == Settings()
    err = capsys.readouterr().err
    assert str(path) in err and "'boot_timeot'" in err and "boot_timeout" in err


def test_docs_table_is_generated_from_the_settings_table() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    start = doc.index("-->\n", doc.index("<!-- BEGIN SETTINGS TABLE")) + 4
    end = doc.index("<!-- END SETTINGS TABLE")
    assert doc[start:end] == settings.reference_markdown(), (
        "docs/configuration.md is out of date: run python3 tests/regen_docs.py")


def test_the_installed_settings_file_is_generated_and_means_the_defaults(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "nspawn-runner.toml"
    assert example.read_text() == settings.template(), (
        "examples/nspawn-runner.toml is out of date: run python3 tests/regen_docs.py")
    loaded = settings.load(example, environ={})
    assert loaded == settings.Settings()
    for row in settings.SETTINGS:
        assert f"\n#{row.name} = " in example.read_text()
    # Uncommenting any line gives a file the driver reads back as that same default.
    for line in example.read_text().splitlines():
        if line.startswith("#") and " = " in line and not line.startswith("# "):
            path = tmp_path / "one.toml"
            path.write_text(line[1:] + "\n")
            assert settings.load(path, environ={}) == settings.Settings(), line
