"""`nspawn-runner toml --merge`: the driver's block goes into an existing config.toml and nothing
else in it changes."""

import os
import stat
from pathlib import Path

import pytest
import tomlkit
from typer.testing import CliRunner

from nspawn_runner.cli import app
from nspawn_runner.errors import SystemFailure
from nspawn_runner.gitlab import block as runner_block
from nspawn_runner.gitlab import merge as runner_merge
from nspawn_runner.gitlab.merge import MergeError
from nspawn_runner.settings import Settings

EXE = "/usr/local/bin/nspawn-runner"
OTHER_RUNNER = '''[[runners]]
  name = "docker-builder"
  url = "https://gitlab.example.com/"
  id = 7
  token = "glrt-docker-token"
  token_obtained_at = 2024-01-02T03:04:05Z
  token_expires_at = 0001-01-01T00:00:00Z
  executor = "docker"
  [runners.cache]
    MaxUploadedArchiveSize = 0
  [runners.docker]
    image = "alpine:3"   # the admin's comment
    privileged = false
'''
HEAD = '''# Written by gitlab-runner register, then edited by hand.
concurrent = 4
check_interval = 0
shutdown_timeout = 0

[session_server]
  session_timeout = 1800

''' + OTHER_RUNNER
# What `gitlab-runner register --executor custom --custom-run-exec ...` leaves, plus an admin's
# own keys and comments.
OURS = '''
[[runners]]
  name = "nspawn on build-1"
  url = "https://gitlab.example.com/"
  id = 8
  token = "glrt-nspawn-token"  # do not share
  token_obtained_at = 2024-01-02T03:04:05Z
  token_expires_at = 0001-01-01T00:00:00Z
  executor = "custom"
  environment = ["LANG=C.UTF-8"]
  [runners.cache]
    MaxUploadedArchiveSize = 0
  [runners.custom]
    run_exec = "/usr/local/bin/nspawn-runner"
    run_args = ["old"]  # kept comment
'''
CONFIG = HEAD + OURS


def block(name: str = "", default_image: str = "bookworm", exe: str = EXE) -> tomlkit.items.Table:
    return runner_block.runner_table(Settings(), default_image, name, exe=[exe])


def write(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def runners(text: str) -> list[dict[str, object]]:
    return list(tomlkit.parse(text).unwrap()["runners"])


def test_updates_the_registered_block_in_place(tmp_path: Path) -> None:
    path = write(tmp_path)
    result = runner_merge.merge_file(path, block())
    assert result.action == "updated" and result.runner == "nspawn on build-1"
    text = path.read_text()
    # Everything before our block is byte for byte what it was: other runner, comments.
    assert text.startswith(HEAD)
    other, ours = runners(text)
    assert other == runners(CONFIG)[0]
    assert ours["name"] == "nspawn on build-1"
    assert ours["url"] == "https://gitlab.example.com/"
    assert ours["token"] == "glrt-nspawn-token" and ours["id"] == 8
    assert ours["environment"] == ["LANG=C.UTF-8"]  # the admin's key
    assert ours["cache"] == {"MaxUploadedArchiveSize": 0}
    assert ours["executor"] == "custom"
    assert ours["builds_dir"] == "/builds" and ours["cache_dir"] == "/cache"
    custom = ours["custom"]
    assert isinstance(custom, dict)
    assert custom["run_args"] == ["run"]
    assert custom["prepare_args"] == ["prepare", "--default-image", "bookworm"]
    assert custom["graceful_kill_timeout"] == runner_block.GRACEFUL_KILL_TIMEOUT
    for stage in ("config", "prepare", "run", "cleanup"):
        assert custom[f"{stage}_exec"] == EXE
    assert '  token = "glrt-nspawn-token"  # do not share\n' in text
    assert '    run_args = ["run"]  # kept comment\n' in text
    # Added keys line up with gitlab-runner's indentation, no blank lines appear.
    assert '\n  builds_dir = "/builds"\n  cache_dir = "/cache"\n  [runners.cache]' in text
    assert '\n    prepare_exec_timeout = 180\n' in text


def test_second_merge_changes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path)
    runner_merge.merge_file(path, block())
    before = path.read_bytes()
    result = runner_merge.merge_file(path, block())
    assert result.action == "unchanged" and not result.changed and result.diff() == ""
    assert path.read_bytes() == before


def test_changed_setting_updates_only_that_value(tmp_path: Path) -> None:
    path = write(tmp_path)
    runner_merge.merge_file(path, block(default_image="bookworm"))
    first = path.read_text()
    result = runner_merge.merge_file(path, block(default_image="trixie"))
    assert result.action == "updated"
    changed = [line for line in result.diff().splitlines()
               if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == ['-    prepare_args = ["prepare", "--default-image", "bookworm"]',
                       '+    prepare_args = ["prepare", "--default-image", "trixie"]']
    assert path.read_text() == first.replace('"bookworm"]', '"trixie"]')


def test_name_picks_the_block(tmp_path: Path) -> None:
    second = OURS.replace("nspawn on build-1", "nspawn two").replace("glrt-nspawn-token", "t2")
    path = write(tmp_path, CONFIG + second)
    result = runner_merge.merge_file(path, block("nspawn two"), "nspawn two")
    assert result.runner == "nspawn two"
    first, two = runners(path.read_text())[1:]
    assert first == runners(CONFIG)[1]  # the other nspawn-runner block is untouched
    assert two["token"] == "t2" and two["builds_dir"] == "/builds"


def test_several_candidates_without_name_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG + OURS.replace("nspawn on build-1", "nspawn two"))
    before = path.read_bytes()
    with pytest.raises(MergeError, match=r"2 runners whose run_exec is nspawn-runner.*--name"):
        runner_merge.merge_file(path, block())
    assert path.read_bytes() == before


def test_unknown_name_adds_a_block(tmp_path: Path) -> None:
    path = write(tmp_path)
    result = runner_merge.merge_file(path, block("new one"), "new one")
    assert result.action == "added" and "placeholder url and token" in result.summary()
    text = path.read_text()
    assert text.startswith(CONFIG + "\n[[runners]]\n")  # after a blank line, nothing else moved
    added = runners(text)[2]
    assert added["name"] == "new one" and added["executor"] == "custom"
    assert "REPLACE" in str(added["token"])


def test_no_block_of_ours_adds_one(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD)
    result = runner_merge.merge_file(path, block())
    assert result.action == "added"
    assert len(runners(path.read_text())) == 2


def test_file_without_runners(tmp_path: Path) -> None:
    path = write(tmp_path, "concurrent = 2\n")
    runner_merge.merge_file(path, block("r"), "r")
    doc = tomlkit.parse(path.read_text()).unwrap()
    assert doc["concurrent"] == 2 and doc["runners"][0]["name"] == "r"
    path = write(tmp_path, "")
    runner_merge.merge_file(path, block("r"), "r")
    assert runners(path.read_text())[0]["name"] == "r"


def test_python_m_installation_is_recognised(tmp_path: Path) -> None:
    text = HEAD + OURS.replace('run_exec = "/usr/local/bin/nspawn-runner"',
                               'run_exec = "/usr/bin/python3"').replace(
        'run_args = ["old"]', 'run_args = ["-m", "nspawn_runner", "run"]')
    path = write(tmp_path, text)
    assert runner_merge.merge_file(path, block()).action == "updated"
    assert len(runners(path.read_text())) == 2


def test_other_executor_named_is_switched_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path)
    runner_merge.merge_file(path, block("docker-builder"), "docker-builder")
    docker = runners(path.read_text())[0]
    assert docker["executor"] == "custom" and docker["token"] == "glrt-docker-token"
    assert "'docker' executor" in capsys.readouterr().err


def test_dry_run_shows_a_diff_and_writes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path)
    before = path.read_bytes()
    result = runner_merge.merge_file(path, block(), dry_run=True)
    assert path.read_bytes() == before
    diff = result.diff()
    assert diff.startswith(f"--- {path}\n+++ {path} (merged)\n")
    assert '+  builds_dir = "/builds"' in diff and '-    run_args = ["old"]  # kept comment' in diff
    assert "would be updated" in result.summary(dry_run=True)


@pytest.mark.parametrize("text", ["concurrent = \n", "[[runners]]\nname = 1\nname = 2\n",
                                  "runners = 1\n", '[runners]\nname = "x"\n',
                                  '[[runners]]\nname = "x"\ncustom = 3\n'])
def test_refusals_leave_the_file_unchanged(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(MergeError, match=str(path)):
        runner_merge.merge_file(path, block("x"), "x")
    assert path.read_bytes() == text.encode()


def test_invalid_toml_names_file_and_parse_error(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG + "oops = \n")
    with pytest.raises(MergeError,
                       match=r"config.toml is not valid TOML \(.*line 37 col 7\).*nothing"):
        runner_merge.merge_file(path, block())
    assert path.read_text() == CONFIG + "oops = \n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match=r"does not exist: register the runner first.*"
                       r"--custom-run-exec /usr/local/bin/nspawn-runner.*nspawn-runner toml >"):
        runner_merge.merge_file(tmp_path / "config.toml", block())
    assert not (tmp_path / "config.toml").exists()


def test_mode_kept_and_no_temporary_file_left(tmp_path: Path) -> None:
    path = write(tmp_path)
    path.chmod(0o600)
    runner_merge.merge_file(path, block())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_owner_kept(tmp_path: Path) -> None:
    path = write(tmp_path)
    os.chown(path, 1234, 5678)
    runner_merge.merge_file(path, block())
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_symlink_stays_a_symlink(tmp_path: Path) -> None:
    real = write(tmp_path)
    link = tmp_path / "link.toml"
    link.symlink_to(real.name)
    runner_merge.merge_file(link, block())
    assert link.is_symlink() and "builds_dir" in real.read_text()


def test_write_failure_is_a_system_failure(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path)

    def fail(*args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(SystemFailure, match="cannot write .*config.toml: Permission denied"):
        runner_merge.merge_file(path, block())
    assert path.read_text() == CONFIG
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


# The command line.

@pytest.fixture
def no_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text("")
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(settings_file))
    monkeypatch.delenv("NSPAWN_RUNNER_ROOT", raising=False)


@pytest.mark.usefixtures("no_settings")
def test_cli_merge_and_dry_run(tmp_path: Path) -> None:
    path = write(tmp_path)
    dry = CliRunner().invoke(app, ["toml", "--merge", str(path), "--dry-run",
                                   "--default-image", "bookworm"])
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith(f"--- {path}\n") and "+  builds_dir" in dry.stdout
    assert "would be updated" in dry.stderr
    assert path.read_text() == CONFIG
    real = CliRunner().invoke(app, ["toml", "--merge", str(path), "--default-image", "bookworm"])
    assert real.exit_code == 0, real.output
    assert real.stdout == "" and "updated" in real.stderr
    custom = runners(path.read_text())[1]["custom"]
    assert isinstance(custom, dict)
    assert custom["prepare_args"][-3:] == ["prepare", "--default-image", "bookworm"]


@pytest.mark.usefixtures("no_settings")
def test_cli_refusals_exit_with_the_system_failure_code(tmp_path: Path) -> None:
    bad = write(tmp_path, "concurrent = \n")
    result = CliRunner().invoke(app, ["toml", "--merge", str(bad)])
    assert result.exit_code == 2
    assert f"{bad} is not valid TOML" in result.stderr
    assert bad.read_text() == "concurrent = \n"
    result = CliRunner().invoke(app, ["toml", "--merge", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2 and "gitlab-runner register" in result.stderr
    result = CliRunner().invoke(app, ["toml", "--dry-run"])
    assert result.exit_code == 2 and "--dry-run needs --merge" in result.stderr


@pytest.mark.usefixtures("no_settings")
def test_cli_without_merge_prints_the_block() -> None:
    result = CliRunner().invoke(app, ["toml", "--name", "r1"])
    assert result.exit_code == 0
    assert runners(result.stdout)[0]["name"] == "r1"
