"""`nspawn-runner toml --merge` against realistic config.toml files: the driver's keys go into
the right block, everything else stays byte for byte, an admin's additions survive, nothing is
appended or written by mistake, and every failure is one line with its fix."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomlkit
from typer.testing import CliRunner

from nspawn_runner.cli import app
from nspawn_runner.gitlab import block as runner_block
from nspawn_runner.gitlab import merge as runner_merge
from nspawn_runner.gitlab.merge import Merge, MergeError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gitlab-config"
REGISTERED = (FIXTURES / "registered.toml").read_text()
ADMIN = (FIXTURES / "merged-by-admin.toml").read_text()
EXE = "/usr/local/bin/nspawn-runner"
OTHER_INSTALL = "/opt/nspawn-runner/bin/nspawn-runner"
# The executables the tests' "host" has.
HOST_FILES = {EXE, OTHER_INSTALL, "/usr/bin/python3", "/usr/local/sbin/nspawn-wrapper"}
# What the interactive registration left of our block, and what follows it.
OURS_BEFORE = REGISTERED[REGISTERED.index("# nspawn-runner, registered"):
                         REGISTERED.index("# A shell runner")]
HEAD = REGISTERED[:REGISTERED.index("# nspawn-runner, registered")]
TAIL = REGISTERED[REGISTERED.index("# A shell runner"):]


def exists(path: str) -> bool:
    return path in HOST_FILES


def wanted(default_image: str = "bookworm", exe: str = EXE,
           **kw: object) -> runner_block.Wanted:
    program, *prefix = exe.split()
    return runner_block.Wanted(program=program, prefix=tuple(prefix),
                               default_image=default_image, **kw)  # type: ignore[arg-type]


def write(tmp_path: Path, text: str = REGISTERED) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def merge(path: Path, w: runner_block.Wanted | None = None, name: str = "", add: bool = False,
          dry_run: bool = False) -> Merge:
    return runner_merge.merge_file(path, w or wanted(), name, add, dry_run, exists=exists)


def runners(text: str) -> list[dict[str, object]]:
    return list(tomlkit.parse(text).unwrap()["runners"])


def custom_of(text: str, index: int) -> dict[str, object]:
    custom = runners(text)[index]["custom"]
    assert isinstance(custom, dict)
    return custom


def files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_completes_the_interactively_registered_block(tmp_path: Path) -> None:
    path = write(tmp_path)
    result = merge(path)
    assert result.action == "updated" and result.runner == "nspawn on build-1"
    text = path.read_text()
    # Everything but our block is byte for byte what it was: globals, other runners, comments.
    assert text.startswith(HEAD) and text.endswith(TAIL)
    docker, ours, deploy = runners(text)
    assert docker == runners(REGISTERED)[0] and deploy == runners(REGISTERED)[2]
    assert ours["token"] == "glrt-nspawn-token" and ours["id"] == 42
    assert ours["environment"] == ["LANG=C.UTF-8"]
    assert ours["builds_dir"] == "/builds" and ours["cache_dir"] == "/cache"
    custom = custom_of(text, 1)
    for stage in runner_block.STAGES:
        assert custom[f"{stage}_exec"] == EXE
    assert custom["prepare_args"] == ["prepare", "--default-image", "bookworm"]
    assert custom["run_args"] == ["run"]
    assert custom["prepare_exec_timeout"] == 180 and custom["cleanup_exec_timeout"] == 90
    assert custom["graceful_kill_timeout"] == 30 and custom["force_kill_timeout"] == 10
    # Added keys line up with gitlab-runner's two spaces per level; no blank lines appear.
    ours_after = text[len(HEAD):len(text) - len(TAIL)]
    assert ours_after == OURS_BEFORE.replace(
        '  environment = ["LANG=C.UTF-8"]\n',
        '  environment = ["LANG=C.UTF-8"]\n  builds_dir = "/builds"\n  cache_dir = "/cache"\n'
    ).replace('    run_exec = ""\n', f'''    run_exec = "{EXE}"
    config_exec = "{EXE}"
    config_args = ["config"]
    config_exec_timeout = 60
    prepare_exec = "{EXE}"
    prepare_args = ["prepare", "--default-image", "bookworm"]
    prepare_exec_timeout = 180
    run_args = ["run"]
    cleanup_exec = "{EXE}"
    cleanup_args = ["cleanup"]
    cleanup_exec_timeout = 90
    graceful_kill_timeout = 30
    force_kill_timeout = 10
''')
    assert result.changed_keys == () and result.kept_keys == ()


def test_a_second_merge_changes_nothing_and_writes_no_backup(tmp_path: Path) -> None:
    path = write(tmp_path)
    merge(path)
    before = path.read_bytes()
    names = files(tmp_path)
    result = merge(path)
    assert result.action == "unchanged" and not result.changed and result.diff() == ""
    assert result.backup is None and path.read_bytes() == before and files(tmp_path) == names


def test_every_change_leaves_a_dated_copy_with_the_same_mode(tmp_path: Path) -> None:
    path = write(tmp_path)
    first = merge(path)
    assert first.backup is not None and first.backup.parent == tmp_path
    assert first.backup.name.startswith("config.toml.") and first.backup.suffix == ".bak"
    assert first.backup.read_text() == REGISTERED
    assert stat.S_IMODE(first.backup.stat().st_mode) == 0o600  # it holds the tokens
    assert f"the previous file is saved as {first.backup}" in first.summary()
    second = merge(path, wanted(default_image="trixie"))
    assert second.backup is not None and second.backup != first.backup
    assert second.backup.read_text() == first.after
    assert first.backup.read_text() == REGISTERED
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".bak"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_admin_additions_survive_a_merge_without_options(tmp_path: Path) -> None:
    path = write(tmp_path, ADMIN)
    result = merge(path, wanted(default_image=""))
    assert result.action == "unchanged", result.diff()
    assert path.read_text() == ADMIN
    assert ("prepare_exec_timeout = 600 (nspawn-runner writes 180 and needs at least 180)"
            in result.kept_keys)


def test_admin_additions_survive_a_new_default_image(tmp_path: Path) -> None:
    path = write(tmp_path, ADMIN)
    result = merge(path, wanted(default_image="trixie"))
    changed = [line for line in result.diff().splitlines()
               if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == [
        '-    prepare_args = ["--verbose", "prepare", "--default-image", "bookworm"]  # verbose '
        'while testing',
        '+    prepare_args = ["--verbose", "prepare", "--default-image", "trixie"]  # verbose '
        'while testing']
    custom = custom_of(path.read_text(), 0)
    assert custom["run_args"] == ["run", "--verbose"] and custom["prepare_exec_timeout"] == 600
    assert '    prepare_exec_timeout = 600  # big images boot slowly here\n' in path.read_text()


def test_default_image_option_forms_are_replaced_in_place(tmp_path: Path) -> None:
    path = write(tmp_path, ADMIN.replace('"--default-image", "bookworm"]',
                                         '"--default-image=bookworm", "--debug"]'))
    merge(path, wanted(default_image="sid"))
    assert custom_of(path.read_text(), 0)["prepare_args"] == [
        "--verbose", "prepare", "--default-image", "sid", "--debug"]


def test_a_too_small_timeout_is_raised_and_says_why(tmp_path: Path) -> None:
    path = write(tmp_path, ADMIN.replace("prepare_exec_timeout = 600", "prepare_exec_timeout = 100")
                 .replace("graceful_kill_timeout = 30", "graceful_kill_timeout = 5"))
    result = merge(path, wanted(default_image="", boot_timeout=200))
    custom = custom_of(path.read_text(), 0)
    assert custom["prepare_exec_timeout"] == 260 and custom["graceful_kill_timeout"] == 30
    assert '    prepare_exec_timeout = 260  # big images boot slowly here\n' in path.read_text()
    summary = result.summary()
    assert ("overwritten: prepare_exec_timeout = 100 -> 260: it must stay 60 s above "
            "boot_timeout (200 s)") in summary
    assert "overwritten: graceful_kill_timeout = 5 -> 30: the run stage needs up to 10 s" in summary


def test_builds_dir_that_the_config_stage_overrides_is_overwritten_with_a_note(
        tmp_path: Path) -> None:
    path = write(tmp_path, ADMIN.replace('builds_dir = "/builds"', 'builds_dir = "/srv/b"'))
    result = merge(path, wanted(default_image=""))
    assert runners(path.read_text())[0]["builds_dir"] == "/builds"
    assert any(n.startswith("builds_dir = '/srv/b' -> '/builds': the config stage reports")
               for n in result.changed_keys)


def test_args_without_their_stage_are_replaced_with_a_note(tmp_path: Path) -> None:
    path = write(tmp_path, ADMIN.replace('run_args = ["run", "--verbose"]', 'run_args = ["old"]'))
    result = merge(path, wanted(default_image=""))
    assert custom_of(path.read_text(), 0)["run_args"] == ["run"]
    assert "run_args = ['old'] -> ['run']: it must name the stage 'run'" in result.summary()


def test_exec_paths_of_another_installation_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path, ADMIN.replace(EXE, OTHER_INSTALL))
    result = merge(path, wanted(default_image=""))
    assert result.action == "unchanged"
    assert result.kept_keys[0] == (
        f"config_exec, prepare_exec, run_exec, cleanup_exec = {OTHER_INSTALL!r} (this command "
        f"is {EXE}; edit them to switch installations)")


def test_missing_exec_keys_follow_the_installation_the_block_uses(tmp_path: Path) -> None:
    path = write(tmp_path, REGISTERED.replace('    run_exec = ""\n',
                                              f'    run_exec = "{OTHER_INSTALL}"\n'))
    merge(path)
    custom = custom_of(path.read_text(), 1)
    assert {custom[f"{s}_exec"] for s in runner_block.STAGES} == {OTHER_INSTALL}


def test_an_exec_path_that_does_not_exist_is_replaced_with_a_note(tmp_path: Path) -> None:
    path = write(tmp_path, ADMIN.replace(EXE, "/gone/bin/nspawn-runner"))
    result = merge(path, wanted(default_image=""))
    custom = custom_of(path.read_text(), 0)
    assert {custom[f"{s}_exec"] for s in runner_block.STAGES} == {EXE}
    assert ("run_exec = '/gone/bin/nspawn-runner' -> '/usr/local/bin/nspawn-runner': "
            "'/gone/bin/nspawn-runner' is no executable file on this host") in result.changed_keys
    assert custom["run_args"] == ["run", "--verbose"]  # the admin's args stay


def test_an_admins_wrapper_is_kept(tmp_path: Path) -> None:
    wrapper = "/usr/local/sbin/nspawn-wrapper"
    path = write(tmp_path, ADMIN.replace(f'run_exec = "{EXE}"', f'run_exec = "{wrapper}"'))
    merge(path, wanted(default_image=""))
    assert custom_of(path.read_text(), 0)["run_exec"] == wrapper


def test_python_m_installation(tmp_path: Path) -> None:
    text = REGISTERED.replace('    run_exec = ""\n', '    run_exec = "/usr/bin/python3"\n'
                              '    run_args = ["-m", "nspawn_runner", "run", "--verbose"]\n')
    path = write(tmp_path, text)
    assert merge(path).action == "updated"
    custom = custom_of(path.read_text(), 1)
    assert custom["run_args"] == ["-m", "nspawn_runner", "run", "--verbose"]
    assert custom["prepare_exec"] == "/usr/bin/python3"
    assert custom["prepare_args"] == ["-m", "nspawn_runner", "prepare", "--default-image",
                                      "bookworm"]
    assert len(runners(path.read_text())) == 3


def test_unknown_name_is_an_error_listing_the_runners(tmp_path: Path) -> None:
    path = write(tmp_path)
    with pytest.raises(MergeError) as caught:
        merge(path, name="nspawn on build-2")
    assert str(caught.value) == (
        f"{path} has no runner named 'nspawn on build-2' (its runners: 'docker-builder', "
        "'nspawn on build-1', 'deploy'): pick one of those with --name, or append a new block "
        "with --add; nothing was changed")
    assert path.read_text() == REGISTERED and files(tmp_path) == ["config.toml"]


def test_no_block_of_ours_needs_add(tmp_path: Path) -> None:
    text = REGISTERED.replace(OURS_BEFORE, "")
    path = write(tmp_path, text)
    with pytest.raises(MergeError, match=r"has no runner that calls nspawn-runner .*its runners: "
                       r"'docker-builder', 'deploy'.*--name, or append a new block with --add"):
        merge(path)
    assert path.read_text() == text and files(tmp_path) == ["config.toml"]


def test_add_appends_a_block_after_a_blank_line(tmp_path: Path) -> None:
    path = write(tmp_path)
    result = merge(path, name="nspawn two", add=True)
    assert result.action == "added" and "placeholder url and token" in result.summary()
    text = path.read_text()
    assert text.startswith(REGISTERED + "\n[[runners]]\n")
    added = runners(text)[3]
    assert added["name"] == "nspawn two" and "REPLACE" in str(added["token"])


def test_add_refuses_an_existing_name(tmp_path: Path) -> None:
    path = write(tmp_path)
    with pytest.raises(MergeError, match="already has a runner named 'deploy': drop --add"):
        merge(path, name="deploy", add=True)
    assert path.read_text() == REGISTERED


def test_add_into_a_file_without_runners(tmp_path: Path) -> None:
    for text in ("concurrent = 2\n", ""):
        path = write(tmp_path, text)
        merge(path, name="r", add=True)
        assert runners(path.read_text())[0]["name"] == "r"


def test_several_candidates_without_name_are_refused(tmp_path: Path) -> None:
    text = REGISTERED + "\n" + OURS_BEFORE.replace("nspawn on build-1", "nspawn two")
    path = write(tmp_path, text)
    with pytest.raises(MergeError, match=r"2 runners with the custom executor and no run_exec "
                       r"\('nspawn on build-1', 'nspawn two'\); pick one with --name"):
        merge(path)
    assert path.read_text() == text


def test_name_picks_the_block(tmp_path: Path) -> None:
    second = OURS_BEFORE.replace("nspawn on build-1", "nspawn two").replace(
        "glrt-nspawn-token", "t2")
    path = write(tmp_path, REGISTERED + "\n" + second)
    result = merge(path, name="nspawn two")
    assert result.runner == "nspawn two"
    first, two = runners(path.read_text())[1], runners(path.read_text())[3]
    assert first == runners(REGISTERED)[1]
    assert two["token"] == "t2" and two["builds_dir"] == "/builds"


def test_a_docker_runner_gets_an_indented_custom_section_before_the_next_comment(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path)
    merge(path, name="docker-builder")
    text = path.read_text()
    assert "'docker' executor" in capsys.readouterr().err
    docker = runners(text)[0]
    assert docker["executor"] == "custom" and docker["token"] == "glrt-docker-token"
    assert f'''    network_mtu = 0
  [runners.custom]
    config_exec = "{EXE}"
''' in text
    assert '''    force_kill_timeout = 10

# nspawn-runner, registered interactively''' in text
    assert '  executor = "custom"\n  builds_dir = "/builds"\n  cache_dir = "/cache"\n' \
           '  [runners.cache]\n' in text
    # The next runners are untouched.
    assert text.endswith(REGISTERED[REGISTERED.index("# nspawn-runner, registered"):])


def test_a_hand_written_unindented_file(tmp_path: Path) -> None:
    text = ('concurrent = 1\n\n[[runners]]\nname = "r"\nurl = "u"\ntoken = "t"\n'
            'executor = "shell"\n\n# next\n[[runners]]\nname = "s"\n')
    path = write(tmp_path, text)
    merge(path, name="r")
    new = path.read_text()
    assert new.endswith('force_kill_timeout = 10\n\n# next\n[[runners]]\nname = "s"\n')
    assert f'\n[runners.custom]\nconfig_exec = "{EXE}"\n' in new
    assert 'executor = "custom"\nbuilds_dir = "/builds"\n' in new


def test_keys_added_to_the_last_table_go_before_the_next_runners_comment(
        tmp_path: Path) -> None:
    text = ADMIN.replace("    force_kill_timeout = 10\n", "") + "\n# another\n[[runners]]\n" \
        '  name = "x"\n'
    path = write(tmp_path, text)
    merge(path, wanted(default_image=""))
    assert path.read_text() == text.replace(
        "    graceful_kill_timeout = 30\n",
        "    graceful_kill_timeout = 30\n    force_kill_timeout = 10\n")


def test_dry_run_shows_a_diff_and_writes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path)
    result = merge(path, dry_run=True)
    assert path.read_text() == REGISTERED and files(tmp_path) == ["config.toml"]
    diff = result.diff()
    assert diff.startswith(f"--- {path}\n+++ {path} (merged)\n")
    assert '+  builds_dir = "/builds"' in diff and '-    run_exec = ""' in diff
    assert "would be updated" in result.summary(dry_run=True) and result.backup is None


@pytest.mark.parametrize("text", ["concurrent = \n", "[[runners]]\nname = 1\nname = 2\n",
                                  "runners = 1\n", '[runners]\nname = "x"\n',
                                  '[[runners]]\nname = "x"\ncustom = 3\n'])
def test_refusals_leave_the_file_unchanged(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(MergeError, match=str(path)):
        merge(path, name="x")
    assert path.read_bytes() == text.encode() and files(tmp_path) == ["config.toml"]


def test_invalid_toml_names_file_and_parse_error(tmp_path: Path) -> None:
    path = write(tmp_path, REGISTERED + "oops = \n")
    with pytest.raises(MergeError, match=r"config.toml is not valid TOML \(.*line 66 col 7\)"
                                         r".*nothing"):
        merge(path)
    assert files(tmp_path) == ["config.toml"]


def test_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match=r"does not exist: register the runner first.*"
                       r"nspawn-runner toml >"):
        merge(tmp_path / "config.toml")
    assert not (tmp_path / "config.toml").exists()


def test_crlf_line_ends_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(ADMIN.replace("\n", "\r\n").encode())
    result = merge(path, wanted(default_image=""))
    assert result.action == "unchanged" and path.read_bytes() == ADMIN.replace(
        "\n", "\r\n").encode()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_owner_kept_on_the_file_and_its_copy(tmp_path: Path) -> None:
    path = write(tmp_path)
    os.chown(path, 1234, 5678)
    result = merge(path)
    assert result.backup is not None
    for p in (path, result.backup):
        assert (p.stat().st_uid, p.stat().st_gid) == (1234, 5678)


def test_symlink_stays_a_symlink(tmp_path: Path) -> None:
    real = write(tmp_path)
    link = tmp_path / "link.toml"
    link.symlink_to(real.name)
    result = merge(link)
    assert link.is_symlink() and "builds_dir" in real.read_text()
    assert result.backup is not None and result.backup.name.startswith("config.toml.")


@pytest.mark.parametrize(("code", "fix"), [
    (errno.EACCES, "run as root (gitlab-runner's /etc/gitlab-runner/config.toml is root's"),
    (errno.EROFS, "the file system is read-only: remount it read-write, or merge into a copy"),
    (errno.ENOSPC, "the file system is full"),
])
@pytest.mark.parametrize("failing", ["backup", "file"])
def test_write_errors_are_one_line_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                code: int, fix: str, failing: str) -> None:
    path = write(tmp_path)
    real_mkstemp = tempfile.mkstemp
    calls = []

    def mkstemp(*args: object, **kw: object) -> tuple[int, str]:
        calls.append(1)
        if failing == "backup" or len(calls) > 1:
            raise OSError(code, os.strerror(code))
        return real_mkstemp(*args, **kw)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(MergeError) as caught:
        merge(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cannot write")
    assert f"{os.strerror(code)}; nothing was changed ({fix}" in message
    assert path.read_text() == REGISTERED and files(tmp_path) == ["config.toml"]


def test_read_errors_are_one_line_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match=r"cannot read .*: Is a directory; nothing was changed "
                       r"\(give the path of gitlab-runner's config.toml file\)"):
        merge(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="runs the merge as another user")
def test_as_non_root_the_documented_message(tmp_path: Path) -> None:
    """The real thing, not a mock: nobody cannot read root's 0600 config.toml."""
    tmp_path.chmod(0o755)
    path = write(tmp_path)
    env = {"PATH": os.environ["PATH"], "NSPAWN_RUNNER_CONFIG": "/dev/null",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
         "nspawn_runner", "toml", "--merge", str(path)], capture_output=True, text=True, env=env,
        cwd="/")
    if "Permission denied" in result.stderr and "python" in result.stderr.split(":")[0]:
        pytest.skip("this checkout's Python is not readable by nobody")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: cannot read {path}: Permission denied; nothing was changed"
                             " (run as root (gitlab-runner's /etc/gitlab-runner/config.toml is "
                             "root's, mode 0600) or as the file's owner)\n")


# The command line.

@pytest.fixture
def no_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text("")
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(settings_file))
    monkeypatch.delenv("NSPAWN_RUNNER_ROOT", raising=False)


@pytest.mark.usefixtures("no_settings")
def test_cli_merge_and_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_block, "executable", lambda: [EXE])
    monkeypatch.setattr(runner_merge, "executable_file", exists)
    path = write(tmp_path)
    dry = CliRunner().invoke(app, ["toml", "--merge", str(path), "--dry-run",
                                   "--default-image", "bookworm"])
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith(f"--- {path}\n") and "+  builds_dir" in dry.stdout
    assert "would be updated" in dry.stderr and path.read_text() == REGISTERED
    real = CliRunner().invoke(app, ["toml", "--merge", str(path), "--default-image", "bookworm"])
    assert real.exit_code == 0, real.output
    assert real.stdout == "" and "updated" in real.stderr and "saved as" in real.stderr
    assert custom_of(path.read_text(), 1)["prepare_args"] == [
        "prepare", "--default-image", "bookworm"]
    added = CliRunner().invoke(app, ["toml", "--merge", str(path), "--add", "--name", "n2"])
    assert added.exit_code == 0, added.output
    assert runners(path.read_text())[3]["name"] == "n2"


@pytest.mark.usefixtures("no_settings")
def test_cli_refusals_exit_with_the_system_failure_code(tmp_path: Path) -> None:
    bad = write(tmp_path, "concurrent = \n")
    result = CliRunner().invoke(app, ["toml", "--merge", str(bad)])
    assert result.exit_code == 2
    assert f"{bad} is not valid TOML" in result.stderr
    result = CliRunner().invoke(app, ["toml", "--merge", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2 and "gitlab-runner register" in result.stderr
    result = CliRunner().invoke(app, ["toml", "--dry-run"])
    assert result.exit_code == 2 and "--dry-run needs --merge" in result.stderr
    result = CliRunner().invoke(app, ["toml", "--add"])
    assert result.exit_code == 2 and "--add needs --merge" in result.stderr
    good = write(tmp_path)
    result = CliRunner().invoke(app, ["toml", "--merge", str(good), "--name", "typo"])
    assert result.exit_code == 2 and "has no runner named 'typo'" in result.stderr
    assert good.read_text() == REGISTERED


@pytest.mark.usefixtures("no_settings")
def test_cli_without_merge_prints_the_block() -> None:
    result = CliRunner().invoke(app, ["toml", "--name", "r1"])
    assert result.exit_code == 0
    assert runners(result.stdout)[0]["name"] == "r1"
