"""What the host does for a job must not follow what the job controls: the exit-status reader,
liveness, the environment of children, gc's bookkeeping. On real systemd:
tests/integration/test_hostile_jobs.py."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from nspawn_runner import layout, proc
from nspawn_runner.errors import SystemFailure, finish
from nspawn_runner.executor import gc, state, status


def me() -> str:
    return state.process_identity(os.getpid())


@pytest.fixture
def results(tmp_path: Path) -> Path:
    d = tmp_path / "run" / "nspawn-runner"
    d.mkdir(parents=True)
    return d


def open_results(results: Path, dev: int = 0) -> int:
    fd = status.open_dir(me(), dev, inside=str(results))
    assert fd is not None
    return fd


def test_reads_a_status_file(results: Path) -> None:
    (results / "u.status").write_text("42\n")
    fd = open_results(results)
    try:
        assert status.parse_status(status.read_small(fd, "u.status")) == 42
        status.remove(fd, "u.status", "u.started")
        assert not (results / "u.status").exists()
    finally:
        os.close(fd)


def test_planted_files_are_not_followed(results: Path, tmp_path: Path) -> None:
    host_file = tmp_path / "host-secret"
    host_file.write_text("7\n")
    (results / "link.status").symlink_to(host_file)
    (results / "zero.status").symlink_to("/dev/zero")
    os.mkfifo(results / "fifo.status")
    (results / "big.status").write_text("1" * 10_000)
    (results / "dir.status").mkdir()
    (results / "junk.status").write_text("4 2")
    fd = open_results(results)
    try:
        start = time.monotonic()
        for name in ("link", "zero", "fifo", "big", "dir", "junk", "missing"):
            assert status.parse_status(status.read_small(fd, f"{name}.status")) is None, name
        assert time.monotonic() - start < 1, "a FIFO must not block the reader"
        status.remove(fd, "link.status")
        assert host_file.exists(), "removing a planted link removes the link only"
    finally:
        os.close(fd)


def test_a_linked_or_remounted_results_dir_is_refused(results: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "u.status").write_text("0")
    results.rmdir()
    results.symlink_to(elsewhere)
    assert status.open_dir(me(), 0, inside=str(results)) is None
    results.unlink()
    results.mkdir()
    dev = os.stat(results).st_dev
    assert status.open_dir(me(), dev + 1, inside=str(results)) is None


def test_a_dead_or_reused_leader_is_refused(results: Path) -> None:
    pid = str(os.getpid())
    assert status.open_dir(f"{pid}:1", 0, inside=str(results)) is None  # another start time
    assert status.open_dir("999999999:1", 0, inside=str(results)) is None
    assert status.open_dir("", 0, inside=str(results)) is None


@pytest.mark.parametrize(("data", "code"), [(b"0\n", 0), (b"255", 255), (b"256", None),
                                            (b"-1", None), (b"", None), (b"1e3", None)])
def test_parse_status(data: bytes, code: int | None) -> None:
    assert status.parse_status(data) == code


def st(**kw: object) -> state.MachineState:
    base: dict[str, object] = dict(machine="nr-1-abcdef01", unit="u", image="i",
                                   backend="overlay", root="/r", overlay=None)
    base.update(kw)
    return state.MachineState(**base)  # type: ignore[arg-type]


def test_alive_needs_gitlab_runner_and_the_job_dir(tmp_path: Path) -> None:
    job_dir = tmp_path / "custom-executor123"
    job_dir.mkdir()
    assert state.alive(st(owner=me(), job_dir=str(job_dir)))
    assert not state.alive(st(owner="999999999:1", job_dir=str(job_dir)))
    job_dir.rmdir()  # gitlab-runner removed it after cleanup: the job is over
    assert not state.alive(st(owner=me(), job_dir=str(job_dir)))


def test_owner_is_the_parent_of_the_process_group_leader() -> None:
    # Under pytest, our group leader is whatever started pytest (or gone, when that exited):
    # the owner is its parent, or one of our ancestors.
    leader = os.getpgrp()
    try:
        with open(f"/proc/{leader}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[1])
    except FileNotFoundError:
        start = os.getppid()
    owner = state.owner_identity()
    assert owner == "" or int(owner.partition(":")[0]) in (start, *_ancestors(start))


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def test_children_get_no_job_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUSTOM_ENV_CI_JOB_TOKEN", "tok")
    monkeypatch.setenv("JOB_RESPONSE_FILE", "/tmp/x/response.json")
    monkeypatch.setenv("SYSTEMD_SECCOMP", "0")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = proc.child_env()
    assert "CUSTOM_ENV_CI_JOB_TOKEN" not in env and "JOB_RESPONSE_FILE" not in env
    assert "SYSTEMD_SECCOMP" not in env and env["LANG"] == "C.UTF-8"
    out = proc.run(["env"], capture=True).stdout
    assert "CUSTOM_ENV_" not in out and "SYSTEMD_SECCOMP" not in out


def test_a_full_disk_is_a_system_failure_naming_the_fix(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    error = OSError(errno.ENOSPC, "No space left on device", "/var/lib/nspawn-runner/x")
    assert finish(error) == 2
    err = capsys.readouterr().err
    assert "no space left on the file system of /var/lib/nspawn-runner/x" in err
    assert "nspawn-runner gc" in err and "internal error" not in err


def test_gc_report_and_dry_run() -> None:
    report = gc.Report(dry_run=True)
    calls: list[str] = []
    report.do("overlay", "/r/overlays/x", "no machine uses it", lambda: calls.append("x"))
    assert calls == [] and report.lines() == ["would remove overlay /r/overlays/x: no machine "
                                              "uses it"]
    report = gc.Report()

    def fail() -> None:
        raise SystemFailure("busy")

    report.do("machine", "a", "why", fail)
    report.do("machine", "b", "why", lambda: calls.append("b"))
    assert [e["item"] for e in report.errors] == ["a"] and calls == ["b"]


def test_builds_slots_and_cache_keys(tmp_path: Path) -> None:
    slot = tmp_path / "builds" / "gitlab.example.com" / "7" / "group" / "2024" / "p" / "slot-0"
    (slot / "src" / "slot-9").mkdir(parents=True)  # inside a checkout: never a slot
    assert list(gc._builds_slots(tmp_path / "builds")) == [slot]
    key = tmp_path / "cache" / "h" / "g" / "p" / "main"
    key.mkdir(parents=True)
    (key / "cache.zip").write_text("z")
    assert list(gc._cache_keys(tmp_path / "cache")) == [key]


def test_private_dirs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    layout.private_dirs(root, root / "cache" / "h" / "g" / "p")
    assert os.stat(root).st_mode & 0o007 == 0
    for d in (root / "cache", root / "cache" / "h" / "g" / "p"):
        assert os.stat(d).st_mode & 0o777 == 0o700, d


def test_state_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "RUNTIME_DIR", tmp_path)
    monkeypatch.setattr("nspawn_runner.runtime.RUNTIME_DIR", str(tmp_path))
    (tmp_path / "nr-1-abcdef01.json").write_text(json.dumps({"schema": 1, "machine": "x"}))
    with pytest.raises(SystemFailure, match="another nspawn-runner version"):
        state.read("nr-1-abcdef01")
    assert state.all_states() == []
