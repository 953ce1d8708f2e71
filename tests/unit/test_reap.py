"""What a stopped machine's unit removes (executor/reap.py), on plain directories."""

import json
import os
import sys
from pathlib import Path

import pytest

from nspawn_runner import layout
from nspawn_runner.errors import SystemFailure
from nspawn_runner.executor import reap
from nspawn_runner.images import store
from nspawn_runner.settings import Settings


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr(layout, "RUNTIME_DIR", tmp_path / "run")
    monkeypatch.setattr("nspawn_runner.runtime.RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "root").mkdir()  # a state root that is not the default must exist
    return Settings(root=tmp_path / "root")


def record(name: str, **data: object) -> Path:
    path = layout.RUNTIME_DIR / f"{name}.json"
    path.write_text(json.dumps({"schema": 1, **data}))
    return path


def image(cfg: Settings, name: str, content: str) -> Path:
    path = store.new_empty(cfg, name)
    (path / "version").write_text(content)
    store.swap_in(cfg, name, path)
    return cfg.images_dir / name


def test_removes_layer_state_status_and_marker(cfg: Settings) -> None:
    overlay = layout.overlay_dir(cfg.root, "nr-1-aaaaaaaa")
    (overlay / "upper" / "etc").mkdir(parents=True)
    (overlay / "upper" / "etc" / "f").write_text("x")
    own = record("nr-1-aaaaaaaa", machine="nr-1-aaaaaaaa", root=str(cfg.root),
                 overlay=str(overlay))
    other = record("nr-2-aaaaaaaa", machine="nr-2-aaaaaaaa", root=str(cfg.root))
    # The machine's own files in the runtime directory (its network's, say) go too.
    status = layout.RUNTIME_DIR / "nr-1-aaaaaaaa.net"
    status.mkdir()
    (status / "host0.network").write_text("x")
    removed = reap.reap("nr-1-aaaaaaaa")
    assert not own.exists() and not status.exists() and not overlay.exists()
    assert other.exists(), "another machine's state is not touched"
    assert str(overlay) in removed


def test_a_pooled_jobs_state_names_the_pool_machine(cfg: Settings) -> None:
    job = record("nr-3-aaaaaaaa", machine="nrp-0123abcd", root=str(cfg.root))
    pool = record("nrp-0123abcd", machine="nrp-0123abcd", root=str(cfg.root))
    ready = layout.RUNTIME_DIR / "nrp-0123abcd.ready"
    ready.write_text("")
    reap.reap("nrp-0123abcd")
    assert not job.exists() and not pool.exists() and not ready.exists()


def test_without_records_the_layer_is_found_under_the_root(cfg: Settings) -> None:
    overlay = layout.overlay_dir(cfg.root, "nr-4-aaaaaaaa")
    (overlay / "upper").mkdir(parents=True)
    assert reap.reap("nr-4-aaaaaaaa") == []  # nowhere to look
    assert overlay.exists()
    reap.reap("nr-4-aaaaaaaa", root=cfg.root)
    assert not overlay.exists()


def test_the_last_user_of_an_old_version_removes_it(cfg: Settings) -> None:
    current = image(cfg, "tiny", "1")
    booted = store.image_id(current)
    record("nr-5-aaaaaaaa", machine="nr-5-aaaaaaaa", root=str(cfg.root), image="tiny",
           image_id=booted)
    record("nr-6-aaaaaaaa", machine="nr-6-aaaaaaaa", root=str(cfg.root), image="tiny",
           image_id=booted)
    image(cfg, "tiny", "2")  # maintenance swaps a new version in
    (old,) = cfg.images_dir.glob(".old-tiny@*")
    reap.reap("nr-5-aaaaaaaa")
    assert old.exists(), "nr-6 still runs on it"
    assert str(old) in reap.reap("nr-6-aaaaaaaa")
    assert not old.exists() and (current / "version").read_text() == "2"


def test_a_current_version_is_never_pruned(cfg: Settings) -> None:
    current = image(cfg, "tiny", "1")
    record("nr-7-aaaaaaaa", machine="nr-7-aaaaaaaa", root=str(cfg.root), image="tiny",
           image_id=store.image_id(current))
    (cfg.images_dir / ".tmp-tiny@dead").mkdir()  # left by an interrupted build
    reap.reap("nr-7-aaaaaaaa")
    # Only a machine of an old version prunes: this one leaves the leftover to gc.
    assert (cfg.images_dir / ".tmp-tiny@dead").exists()


def test_unit_property(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NSPAWN_RUNNER_RUNTIME_DIR", raising=False)
    assert reap.unit_properties("nr-1-aaaaaaaa") == [
        f"--property=ExecStopPost=-{sys.executable} -m nspawn_runner.executor.reap "
        "nr-1-aaaaaaaa"]
    monkeypatch.setenv("NSPAWN_RUNNER_RUNTIME_DIR", "/tmp/run")
    assert reap.unit_properties("nr-1-aaaaaaaa")[1] == (
        "--property=Environment=NSPAWN_RUNNER_RUNTIME_DIR=/tmp/run")
    monkeypatch.setenv("NSPAWN_RUNNER_RUNTIME_DIR", "/tmp/a b")
    with pytest.raises(SystemFailure, match="systemd would interpret"):
        reap.unit_properties("nr-1-aaaaaaaa")


@pytest.mark.parametrize("argv", [[], ["a", "b"], ["../x"], ["nr-1 x"], [""]])
def test_main_refuses_anything_but_a_machine_name(argv: list[str]) -> None:
    assert reap.main(argv) == 2


def test_prepare_waits_only_when_space_is_low(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A file system at 50 % never makes prepare wait, nor run a command.
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result(
        (4096, 4096, 1000, 500, 500, 0, 0, 0, 0, 255)))
    assert not reap.low_on_space(tmp_path)
    monkeypatch.setattr("nspawn_runner.proc.run", lambda *a, **k: pytest.fail("ran a command"))
    reap.wait_for_space(tmp_path, 5)
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result(
        (4096, 4096, 1000, 50, 50, 0, 0, 0, 0, 255)))
    assert reap.low_on_space(tmp_path)
