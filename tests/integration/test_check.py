"""`nspawn-runner check` on real systemd: a good host passes (image booted for real), a broken
setting fails with a fix and the system-failure exit code, and a test boot leaves nothing. And
`toml --merge`: the block it completes in a registered config.toml runs a job."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import tomlkit
from conftest import FAKE_GITLAB_RUNNER, IMAGE, ROOTS, Driver, leftovers, settled_leftovers
from gitlab_emulator import RunnerConfig


def check(settings: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": str(settings)}
    env.pop("NSPAWN_RUNNER_ROOT", None)
    return subprocess.run(["nspawn-runner", "check", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def rows(stdout: str) -> dict[str, tuple[str, str, str]]:
    """check name -> (status, detail, fix) from the table."""
    lines = stdout.splitlines()
    column = lines[0].index("STATUS")
    out: dict[str, tuple[str, str, str]] = {}
    name = ""
    for line in lines[1:]:
        if not line.strip():
            break
        if line[:column].strip():
            name = line[:column].strip()
            status, _, detail = line[column:].partition("  ")
            out[name] = (status.strip(), detail.strip(), "")
        elif line.strip().startswith("fix: "):
            status, detail, _ = out[name]
            out[name] = (status, detail, line.strip().removeprefix("fix: "))
    return out


def write_settings(path: Path, root: str | Path, backend: str = "auto") -> Path:
    path.write_text(f'root = "{root}"\nbackend = "{backend}"\n'
                    f'gitlab_runner = "{FAKE_GITLAB_RUNNER}"\n')
    return path


@pytest.mark.parametrize("backend", ["overlay", "btrfs"])
def test_good_host_passes_and_boots_the_image(tmp_path: Path, backend: str) -> None:
    root = ROOTS[backend][0]
    result = check(write_settings(tmp_path / "config.toml", root))
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    for name in ("settings", "systemd (PID 1)", "systemd version", "commands",
                 "machined (D-Bus)", "state root", "free space", "images", f"image {IMAGE}",
                 "gitlab-runner"):
        assert table[name][0] == "ok", (name, result.stdout)
    assert table["systemd version"][1].startswith("systemd 2")
    assert f"{backend} backend (auto)" in table["state root"][1]
    assert table[f"image {IMAGE}"][1].startswith("boots and runs /bin/bash")
    assert table["cgroups"][0] in ("ok", "warn")
    assert result.stdout.rstrip().splitlines()[-1].startswith("all checks passed")
    assert not leftovers(Path(root)), "the test boot left something behind"


def test_json_and_no_boot(tmp_path: Path) -> None:
    result = check(write_settings(tmp_path / "config.toml", ROOTS["overlay"][0]),
                   "--no-boot", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True
    image = next(c for c in data["checks"] if c["name"] == f"image {IMAGE}")
    assert image["status"] == "ok" and "--no-boot" in image["detail"]


def test_root_without_images_fails_with_a_fix(tmp_path: Path) -> None:
    root = tmp_path / "empty-root"
    (root / "images").mkdir(parents=True)
    result = check(write_settings(tmp_path / "config.toml", root))
    assert result.returncode == 2, result.stdout + result.stderr
    status, detail, fix = rows(result.stdout)["images"]
    assert status == "FAIL"
    assert detail == f"no images in {root}/images"
    assert "nspawn-runner chroot-create NAME" in fix
    assert rows(result.stdout)["systemd (PID 1)"][0] == "ok"
    assert "error: host check failed: images" in result.stderr


def test_image_that_does_not_boot_fails(tmp_path: Path) -> None:
    root = tmp_path / "root"
    image = root / "images" / "noboot"
    (image / "usr/lib/systemd").mkdir(parents=True)
    (image / "usr/lib/systemd/systemd").write_text("#!/bin/sh\nexit 1\n")
    (image / "usr/lib/systemd/systemd").chmod(0o755)
    result = check(write_settings(tmp_path / "config.toml", root), "--boot-timeout", "20")
    assert result.returncode == 2, result.stdout + result.stderr
    status, detail, fix = rows(result.stdout)["image noboot"]
    assert status == "FAIL" and "failed to boot from image 'noboot'" in detail, result.stdout
    assert f"systemd-nspawn -D {image} --boot" in fix
    assert not leftovers(root)


REGISTERED = """concurrent = 2
check_interval = 0

[[runners]]
  name = "docker"
  url = "https://gitlab.example.com"
  token = "glrt-docker"
  executor = "docker"
  [runners.docker]
    image = "alpine"  # kept

[[runners]]
  name = "nspawn"
  url = "https://gitlab.example.com"
  token = "glrt-nspawn"  # kept too
  executor = "custom"
  [runners.cache]
    MaxUploadedArchiveSize = 0
  [runners.custom]
    run_exec = "/usr/local/bin/nspawn-runner"
"""


def test_merged_block_runs_a_job(tmp_path: Path) -> None:
    driver = Driver("overlay", Path(ROOTS["overlay"][0]), tmp_path / "settings.toml")
    driver.write_settings()
    config = tmp_path / "config.toml"
    config.write_text(REGISTERED)
    config.chmod(0o600)
    env = {**os.environ, "NSPAWN_RUNNER_CONFIG": str(driver.settings)}
    merged = subprocess.run(["nspawn-runner", "toml", "--merge", str(config),
                             "--default-image", IMAGE], capture_output=True, text=True,
                            env=env)
    assert merged.returncode == 0, merged.stderr
    text = config.read_text()
    assert text.startswith(REGISTERED.split("[[runners]]\n  name = \"nspawn\"")[0])
    assert '  token = "glrt-nspawn"  # kept too\n' in text
    assert (config.stat().st_mode & 0o777) == 0o600
    runner = tomlkit.parse(text).unwrap()["runners"][1]
    custom = runner["custom"]

    def argv(stage: str) -> list[str]:
        return [custom[f"{stage}_exec"], *custom[f"{stage}_args"]]

    cfg = RunnerConfig(
        config_exec=argv("config"), prepare_exec=argv("prepare"), run_exec=argv("run"),
        cleanup_exec=argv("cleanup"), builds_dir=runner["builds_dir"],
        cache_dir=runner["cache_dir"],
        prepare_exec_timeout=custom["prepare_exec_timeout"],
        graceful_kill_timeout=custom["graceful_kill_timeout"],
        force_kill_timeout=custom["force_kill_timeout"], retry_delay=0.2,
        extra_process_env={"NSPAWN_RUNNER_CONFIG": str(driver.settings)})
    # No image: the --default-image that the merge put into prepare_args is used.
    result = driver.run(driver.job(["test -d /run/systemd/system", "echo merged-ok"],
                                   image=None), cfg)
    assert result.status == "success", result.log
    assert "merged-ok" in result.log and f"from image '{IMAGE}'" in result.log
    assert not settled_leftovers(driver.root)
