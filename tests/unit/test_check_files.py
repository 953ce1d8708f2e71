"""`check` reads every file a job depends on: each image file (also of images not built yet) and,
with --gitlab-config, the driver's blocks in gitlab-runner's config.toml."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_hostcheck import FakeHost, by_name, make_image

from nspawn_runner import check as host_check
from nspawn_runner.check import Report, Status
from nspawn_runner.gitlab import merge

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gitlab-config"
EXE = "/usr/local/bin/nspawn-runner"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    make_image(root, "bookworm")
    return root


@pytest.fixture
def files(tmp_path: Path) -> Path:
    path = tmp_path / "images.d"
    path.mkdir()
    return path


def run(root: Path, files: Path, settings: str = "", gitlab_config: Path | None = None) -> Report:
    config = root.parent / "config.toml"
    config.write_text(f'root = "{root}"\nimages_config_dir = "{files}"\n' + settings)
    return host_check.run(FakeHost(root), config, environ={}, boot=False,
                          gitlab_config=gitlab_config)


def test_every_image_file_is_read_also_of_images_not_built(root: Path, files: Path) -> None:
    (files / "bookworm.toml").write_text('suite = "bookworm"\n')
    (files / "sid.toml").write_text('suite = "sid"\n')
    (files / "broken.toml").write_text('suite = "sid"\n[limits]\nbinds = ["/root:/r"]\n')
    (files / "bad name!.toml").write_text('suite = "sid"\n')
    rows = by_name(run(root, files))
    assert rows["image bookworm"].status is Status.OK
    assert "image file bookworm.toml" not in rows  # read with its image
    assert rows["image file sid.toml"].status is Status.WARN
    assert rows["image file sid.toml"].detail == "image 'sid' is not built yet"
    assert rows["image file sid.toml"].fix == "nspawn-runner chroot-create sid"
    broken = rows["image file broken.toml"]
    assert broken.status is Status.FAIL and "it exposes /root" in broken.detail
    assert broken.fix == f"fix {files}/broken.toml (docs/images.md)"
    bad = rows["image file bad name!.toml"]
    assert bad.status is Status.FAIL and "not a valid image name" in bad.detail


def test_image_files_are_read_even_without_a_state_root(tmp_path: Path, files: Path) -> None:
    (files / "sid.toml").write_text("suite = 3\n")
    rows = by_name(run(tmp_path / "absent", files))
    assert rows["state root"].status is Status.FAIL
    assert rows["image file sid.toml"].status is Status.FAIL
    assert "invalid value 3 for 'suite'" in rows["image file sid.toml"].detail


def test_default_image_with_a_file_but_not_built(root: Path, files: Path) -> None:
    (files / "sid.toml").write_text('suite = "sid"\n')
    row = by_name(run(root, files, 'default_image = "sid"\n'))["default image"]
    assert row.status is Status.FAIL and row.fix.startswith("nspawn-runner chroot-create sid")


# --gitlab-config

@pytest.fixture
def executables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merge, "executable_file", lambda p: p == EXE)


def merged(tmp_path: Path) -> Path:
    path = tmp_path / "gitlab.toml"
    path.write_text((FIXTURES / "merged-by-admin.toml").read_text())
    return path


def gitlab_rows(report: Report) -> dict[str, host_check.Check]:
    return {c.name: c for c in report.checks if c.name.startswith(("runner ", "gitlab-runner "))}


@pytest.mark.usefixtures("executables")
def test_a_good_block(tmp_path: Path, root: Path, files: Path) -> None:
    path = merged(tmp_path)
    rows = gitlab_rows(run(root, files, gitlab_config=path))
    assert list(rows) == ["runner nspawn on build-1"]
    row = rows["runner nspawn on build-1"]
    assert row.status is Status.OK, row
    assert row.detail == (f"{path}: every stage calls {EXE}; timeouts above boot_timeout and "
                          "stop_timeout")


@pytest.mark.usefixtures("executables")
@pytest.mark.parametrize(("old", "new", "status", "says"), [
    ("prepare_exec_timeout = 600", "prepare_exec_timeout = 100", Status.FAIL,
     "prepare_exec_timeout 100 is not above boot_timeout 120"),
    ("prepare_exec_timeout = 600", "prepare_exec_timeout = 150", Status.WARN,
     "prepare_exec_timeout 150 leaves less than 60 s above boot_timeout 120"),
    ("cleanup_exec_timeout = 90", "cleanup_exec_timeout = 30", Status.FAIL,
     "cleanup_exec_timeout 30 is not above stop_timeout 30"),
    ('run_exec = "/usr/local/bin/nspawn-runner"', 'run_exec = "/opt/gone/nspawn-runner"',
     Status.FAIL, "run_exec '/opt/gone/nspawn-runner' is no executable file"),
    ('cleanup_args = ["cleanup"]', 'cleanup_args = ["clean"]', Status.FAIL,
     "cleanup_args ['clean'] does not name the stage 'cleanup'"),
    ('config_exec = "/usr/local/bin/nspawn-runner"\n', "", Status.FAIL,
     "no config_exec: gitlab-runner skips the config stage"),
    ('"--default-image", "bookworm"', '"--default-image", "trixie"', Status.FAIL,
     "prepare_args name --default-image 'trixie', which is no image on this host"),
    ('"prepare", "--default-image", "bookworm"', '"prepare"', Status.WARN,
     "jobs without `image:` fail"),
    ("graceful_kill_timeout = 30", "graceful_kill_timeout = 3", Status.WARN,
     "graceful_kill_timeout 3 is below the 10 s"),
    ('builds_dir = "/builds"', 'builds_dir = "/b"', Status.WARN,
     "builds_dir '/b' differs from the setting '/builds'"),
])
def test_block_problems(tmp_path: Path, root: Path, files: Path, old: str, new: str,
                        status: Status, says: str) -> None:
    path = tmp_path / "gitlab.toml"
    text = (FIXTURES / "merged-by-admin.toml").read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    row = gitlab_rows(run(root, files, gitlab_config=path))["runner nspawn on build-1"]
    assert row.status is status and says in row.detail, row
    assert row.fix == f"nspawn-runner toml --merge {path} --name 'nspawn on build-1'"


@pytest.mark.usefixtures("executables")
def test_an_unbuilt_default_image_names_the_command(tmp_path: Path, root: Path,
                                                    files: Path) -> None:
    (files / "trixie.toml").write_text('suite = "trixie"\n')
    path = tmp_path / "gitlab.toml"
    path.write_text((FIXTURES / "merged-by-admin.toml").read_text().replace(
        '"--default-image", "bookworm"', '"--default-image", "trixie"'))
    row = gitlab_rows(run(root, files, gitlab_config=path))["runner nspawn on build-1"]
    assert "not built yet (nspawn-runner chroot-create trixie)" in row.detail


@pytest.mark.usefixtures("executables")
def test_a_registered_but_unmerged_block(tmp_path: Path, root: Path, files: Path) -> None:
    path = FIXTURES / "registered.toml"
    rows = gitlab_rows(run(root, files, gitlab_config=path))
    row = rows["gitlab-runner config"]
    assert row.status is Status.FAIL
    assert row.detail == (f"{path}: no runner calls nspawn-runner (runners: 'docker-builder', "
                          "'nspawn on build-1', 'deploy')")
    assert row.fix == f"nspawn-runner toml --merge {path} --name 'nspawn on build-1'"


def test_an_unreadable_gitlab_config(tmp_path: Path, root: Path, files: Path) -> None:
    rows = gitlab_rows(run(root, files, gitlab_config=tmp_path / "absent.toml"))
    row = rows["gitlab-runner config"]
    assert row.status is Status.FAIL and "does not exist: register the runner" in row.detail
