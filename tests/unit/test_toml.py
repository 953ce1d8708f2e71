import tomlkit
from typer.testing import CliRunner

from nspawn_runner.cli import app
from nspawn_runner.gitlab import block
from nspawn_runner.settings import Settings


def test_block_parses_back() -> None:
    wanted = block.Wanted.from_settings(Settings(boot_timeout=100, stop_timeout=5), "bookworm",
                                        exe=["/usr/local/bin/nspawn-runner"])
    text = block.render(wanted, "r1")
    doc = tomlkit.parse(text).unwrap()
    (runner,) = doc["runners"]
    assert runner["executor"] == "custom"
    assert runner["name"] == "r1"
    assert runner["builds_dir"] == "/builds" and runner["cache_dir"] == "/cache"
    custom = runner["custom"]
    for stage in ("config", "prepare", "run", "cleanup"):
        assert custom[f"{stage}_exec"] == "/usr/local/bin/nspawn-runner"
    assert custom["config_args"] == ["config"]
    assert custom["prepare_args"] == ["prepare", "--default-image", "bookworm"]
    assert custom["run_args"] == ["run"]
    assert custom["cleanup_args"] == ["cleanup"]
    assert custom["prepare_exec_timeout"] > 100  # above boot_timeout
    assert custom["force_kill_timeout"] == 10


def test_python_m_invocation() -> None:
    text = block.render(block.Wanted.from_settings(
        Settings(), exe=["/usr/bin/python3", "-m", "nspawn_runner"]))
    custom = tomlkit.parse(text).unwrap()["runners"][0]["custom"]
    assert custom["run_exec"] == "/usr/bin/python3"
    assert custom["run_args"] == ["-m", "nspawn_runner", "run"]


def test_cli_toml_refuses_bad_default_image() -> None:
    result = CliRunner().invoke(app, ["toml", "--default-image", "../etc"])
    assert result.exit_code == 2
    assert "invalid image name" in result.output


def test_example_config_matches_the_generated_block() -> None:
    from pathlib import Path

    example = tomlkit.parse(
        (Path(__file__).resolve().parents[2] / "examples" / "config.toml").read_text()).unwrap()
    generated = tomlkit.parse(block.render(block.Wanted.from_settings(
        Settings(), "bookworm", exe=["/usr/local/bin/nspawn-runner"]))).unwrap()
    (ex,), (gen,) = example["runners"], generated["runners"]
    assert ex["custom"] == gen["custom"]
    for key in ("executor", "builds_dir", "cache_dir"):
        assert ex[key] == gen[key]
