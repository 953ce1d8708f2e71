"""Image versions on disk: atomic swap, locks, which old versions may go; and the commands'
reports and exit codes."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nspawn_runner import layout
from nspawn_runner.cli import app
from nspawn_runner.errors import Cancelled, SystemFailure
from nspawn_runner.executor import state
from nspawn_runner.host import fs
from nspawn_runner.images import commands, store
from nspawn_runner.settings import Settings


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr(layout, "RUNTIME_DIR", tmp_path / "run")
    monkeypatch.setattr("nspawn_runner.runtime.RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "root").mkdir()  # commands never make a state root other than the default
    return Settings(root=tmp_path / "root", images_config_dir=tmp_path / "images.d")


def version(cfg: Settings, name: str, content: str) -> Path:
    path = store.new_empty(cfg, name)
    (path / "version").write_text(content)
    return path


def job_on(cfg: Settings, machine: str, image: str, path: Path | None) -> None:
    data = {"machine": machine, "image": image, "schema": 1,
            "image_id": store.image_id(path) if path else ""}
    (layout.RUNTIME_DIR / f"{machine}.json").write_text(json.dumps(data))


def test_new_versions_are_hidden_until_swapped_in(cfg: Settings) -> None:
    from nspawn_runner.images import names

    first = version(cfg, "tiny", "1")
    assert first.name.startswith(".tmp-tiny@") and oct(first.stat().st_mode)[-3:] == "755"
    assert names.available(cfg) == []
    assert store.swap_in(cfg, "tiny", first) is None
    assert names.available(cfg) == ["tiny"]
    image = cfg.images_dir / "tiny"
    booted = store.image_id(image)
    old = store.swap_in(cfg, "tiny", version(cfg, "tiny", "2"))
    assert (image / "version").read_text() == "2"
    assert old is not None and old.name.startswith(".old-tiny@")
    assert store.image_id(old) == booted, "the same directory, renamed"
    assert names.available(cfg) == ["tiny"]


def test_old_versions_go_when_no_job_uses_them(cfg: Settings) -> None:
    store.swap_in(cfg, "tiny", version(cfg, "tiny", "1"))
    job_on(cfg, "nr-1-a", "tiny", cfg.images_dir / "tiny")
    old = store.swap_in(cfg, "tiny", version(cfg, "tiny", "2"))
    job_on(cfg, "nr-2-a", "tiny", cfg.images_dir / "tiny")  # the next job: new version
    assert old is not None
    assert store.prune_old_versions(cfg, state.image_uses()) == [] and old.exists()
    assert [u.machine for u in state.image_uses() if u.image == "tiny"] == ["nr-1-a", "nr-2-a"]
    (layout.RUNTIME_DIR / "nr-1-a.json").unlink()
    assert store.prune_old_versions(cfg, state.image_uses()) == [old] and not old.exists()
    assert (cfg.images_dir / "tiny" / "version").read_text() == "2"


def test_state_without_image_id_keeps_every_old_version(cfg: Settings) -> None:
    store.swap_in(cfg, "tiny", version(cfg, "tiny", "1"))
    old = store.swap_in(cfg, "tiny", version(cfg, "tiny", "2"))
    job_on(cfg, "nr-1-a", "tiny", None)
    assert store.prune_old_versions(cfg, state.image_uses()) == []
    assert old is not None and old.exists()


def test_leftovers_of_interrupted_operations(cfg: Settings) -> None:
    busy = version(cfg, "busy", "half")
    stale = version(cfg, "stale", "half")
    with store.lock(cfg, "busy", "chroot-create busy"):
        with (pytest.raises(store.ImageBusy, match="chroot-create busy .pid"),
              store.lock(cfg, "busy", "chroot-login busy")):
            pass
        assert store.prune_old_versions(cfg, state.image_uses()) == [stale]
        assert busy.exists()
    assert store.prune_old_versions(cfg, state.image_uses()) == [busy]


def test_remove_tree_does_not_follow_links(cfg: Settings, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").touch()
    tree = version(cfg, "x", "1")
    (tree / "link").symlink_to(outside)
    fs.remove_tree(tree)
    assert not tree.exists() and (outside / "keep").exists()


def test_meta(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    store.write_meta(tmp_path, created=1.0)
    store.write_meta(tmp_path, maintained=2.0)
    assert store.read_meta(tmp_path) == {"created": 1.0, "maintained": 2.0, "schema": 1}
    link = tmp_path / "linked"
    (link / "etc").mkdir(parents=True)
    (link / "etc" / "nspawn-runner").symlink_to(tmp_path)
    with pytest.raises(SystemFailure, match="symlink"):
        store.write_meta(link, created=1.0)


def test_maintenance_goes_on_after_a_failure(cfg: Settings,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def one(settings: Settings, name: str, in_use: object) -> str:
        if name == "bad":
            raise SystemFailure("setup command 'exit 3' failed with status 3\nmore")
        if name == "bug":
            raise KeyError("x")
        return "provisioned"

    monkeypatch.setattr(commands, "_maintain_one", one)
    outcomes = commands.maintenance(cfg, ["bad", "bug", "good"], state.image_uses)
    assert [(o.name, o.action, bool(o.error)) for o in outcomes] == [
        ("bad", "", True), ("bug", "", True), ("good", "provisioned", False)]
    report = commands.maintenance_report(outcomes).splitlines()
    assert report[0].split() == ["IMAGE", "RESULT", "TIME"]
    assert report[1].split()[:2] == ["bad", "FAILED"] and report[1].endswith("status 3")
    assert report[3].split()[:2] == ["good", "provisioned"]
    with pytest.raises(SystemFailure, match="failed for 2 of 3 images: bad, bug"):
        commands.check_outcomes(outcomes)


def test_maintenance_stops_when_cancelled(cfg: Settings,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def one(settings: Settings, name: str, in_use: object) -> str:
        raise Cancelled("SIGTERM")

    monkeypatch.setattr(commands, "_maintain_one", one)
    with pytest.raises(Cancelled):
        commands.maintenance(cfg, ["a", "b"], state.image_uses)


def test_list(cfg: Settings) -> None:
    store.swap_in(cfg, "tiny", version(cfg, "tiny", "1"))
    store.write_meta(cfg.images_dir / "tiny", created=0.0, maintained=0.0)
    job_on(cfg, "nr-1-a", "tiny", cfg.images_dir / "tiny")
    store.swap_in(cfg, "tiny", version(cfg, "tiny", "2"))
    cfg.images_config_dir.mkdir()
    (cfg.images_config_dir / "planned.toml").write_text('suite = "sid"\n')
    rows = {r["name"]: r for r in commands.list_images(cfg, state.image_uses)}
    assert rows["tiny"]["jobs"] == ["nr-1-a"] and rows["tiny"]["old_versions"] == 1
    assert rows["tiny"]["exists"] and rows["tiny"]["file"] is None
    assert rows["planned"]["exists"] is False and rows["planned"]["size"] is None
    table = commands.list_report(list(rows.values())).splitlines()
    assert table[0].split() == ["NAME", "SIZE", "CREATED", "MAINTAINED", "BACKEND", "JOBS"]
    assert "(missing)" in table[1] and "1 (+1 old version)" in table[2]


def test_remove_refuses_while_jobs_use_the_image(cfg: Settings) -> None:
    store.swap_in(cfg, "tiny", version(cfg, "tiny", "1"))
    job_on(cfg, "nr-1-a", "tiny", cfg.images_dir / "tiny")
    with pytest.raises(store.ImageBusy, match="used by 1 running job.*--force"):
        commands.remove(cfg, "tiny", state.image_uses)
    commands.remove(cfg, "tiny", state.image_uses, force=True)
    assert not (cfg.images_dir / "tiny").exists()
    assert [p.name[:10] for p in cfg.images_dir.glob(".old-*")] == [".old-tiny@"], "in use"


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'root = "{tmp_path}/root"\nimages_config_dir = "{tmp_path}/images.d"\n')
    (tmp_path / "images.d").mkdir(exist_ok=True)
    return path


def test_cli_errors_are_system_failures(tmp_path: Path, cfg: Settings,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(write_config(tmp_path)))
    monkeypatch.setattr("nspawn_runner.images.spec.shutil.which", lambda name: f"/usr/bin/{name}")
    (tmp_path / "images.d" / "bad.toml").write_text('suite = "sid"\nvariant = "tiny"\n')
    result = CliRunner().invoke(app, ["chroot-create", "bad"])
    assert result.exit_code == 2
    assert f"{tmp_path}/images.d/bad.toml: invalid value 'tiny' for 'variant'" in result.output
    result = CliRunner().invoke(app, ["chroot-create", "none"])
    assert result.exit_code == 2 and "has no image file" in result.output
    result = CliRunner().invoke(app, ["chroot-create", "../x"])
    assert result.exit_code == 2 and "invalid image name" in result.output
    result = CliRunner().invoke(app, ["chroot-list", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["name"] == "bad"
    assert not os.path.exists(tmp_path / "root" / "images" / "bad")


def test_cli_maintenance_prints_the_summary_and_fails(tmp_path: Path, cfg: Settings,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSPAWN_RUNNER_CONFIG", str(write_config(tmp_path)))
    def one(settings: Settings, name: str, in_use: object) -> str:
        if name == "b":
            raise SystemFailure("broken")
        return "created"

    monkeypatch.setattr(commands, "_maintain_one", one)
    result = CliRunner().invoke(app, ["chroot-maintenance", "a", "b"])
    assert result.exit_code == 2
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[1][:2] == ["a", "created"] and rows[2][:2] == ["b", "FAILED"]
    assert rows[2][-1] == "broken"
