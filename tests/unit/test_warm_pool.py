"""The warm pool's bookkeeping (executor/pool.py): which jobs a pool machine may serve, names,
records. Its behaviour with systemd is in tests/integration/test_pool.py."""

import dataclasses
from pathlib import Path

import pytest

from nspawn_runner import layout
from nspawn_runner.executor import pool
from nspawn_runner.host import machine
from nspawn_runner.host.backends import Backend
from nspawn_runner.host.limits import Limits
from nspawn_runner.settings import Settings


def spec(**kw: object) -> machine.BootSpec:
    args: dict[str, object] = dict(
        machine="nr-1-abcdef01", unit="nspawn-runner-nr-1-abcdef01.service", image="bookworm",
        image_path=Path("/r/images/bookworm"), backend=Backend.BTRFS, root=Path("/r"),
        boot_timeout=60, stop_timeout=20,
        binds=((Path("/r/cache/h/g/p"), "/cache/g/p"), (Path("/run/nspawn-runner/x.d"), "/run")),
        binds_ro=((Path("/usr/bin/gitlab-runner"), "/usr/local/bin/gitlab-runner"),),
        description="nspawn-runner job 1 on image bookworm",
        properties=("--property=CPUWeight=50", "--property=RuntimeMaxSec=600",
                    "--property=ExecStopPost=-/py -m nspawn_runner.executor.reap nr-1-abcdef01"),
        init_args=("systemd.mask=getty.target",))
    args.update(kw)
    return machine.BootSpec(**args)  # type: ignore[arg-type]


def test_the_key_ignores_what_is_given_at_hand_out() -> None:
    other_job = dataclasses.replace(
        spec(), machine="nr-2-abcdef01", unit="nspawn-runner-nr-2-abcdef01.service",
        description="nspawn-runner job 2 on image bookworm",
        binds=((Path("/r/cache/h/g/other"), "/cache/g/other"),),
        properties=("--property=CPUWeight=50", "--property=RuntimeMaxSec=60",
                    "--property=ExecStopPost=-/py -m nspawn_runner.executor.reap nr-2-abcdef01"))
    assert pool.key(other_job) == pool.key(spec())


@pytest.mark.parametrize("change", [
    {"image": "sid"}, {"backend": Backend.OVERLAY}, {"root": Path("/s")},
    {"properties": ("--property=CPUWeight=60",)}, {"nspawn_options": ("--private-network",)},
    {"binds_ro": ()}, {"personality": "x86"}, {"init_args": ()}, {"stop_timeout": 5},
])
def test_the_key_changes_with_what_is_fixed_at_boot(change: dict[str, object]) -> None:
    assert pool.key(spec(**change)) != pool.key(spec())


def test_pool_names() -> None:
    assert pool.is_pool_name("nrp-0123abcd")
    for name in ("nrp-0123abc", "nrp-0123abcg", "nr-1-0123abcd", "nrp-0123abcd.json"):
        assert not pool.is_pool_name(name)


def test_no_pool_for_private_users(tmp_path: Path) -> None:
    cfg = Settings(root=tmp_path, images_config_dir=tmp_path / "images.d", pool_size=2)
    assert pool.size(cfg, "bookworm", Limits()) == 2
    assert pool.size(cfg, "bookworm", Limits(private_users=True)) == 0


def test_an_image_file_overrides_the_pool_size(tmp_path: Path) -> None:
    files = tmp_path / "images.d"
    files.mkdir()
    (files / "bookworm.toml").write_text('suite = "bookworm"\nbootstrap = "mmdebstrap"\n'
                                         "pool_size = 0\n")
    cfg = Settings(root=tmp_path, images_config_dir=files, pool_size=2)
    assert pool.size(cfg, "bookworm", Limits()) == 0
    assert pool.size(cfg, "sid", Limits()) == 2


def test_records_skip_what_they_cannot_read(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "RUNTIME_DIR", tmp_path)
    monkeypatch.setattr("nspawn_runner.runtime.RUNTIME_DIR", str(tmp_path))
    good = pool.PoolMachine(machine="nrp-0123abcd", unit="u", image="bookworm",
                            image_path="/r/images/bookworm", image_id="1:2", backend="btrfs",
                            root="/r", overlay=None, key="k", owner="1:1", booted=2.0)
    older = good._replace(machine="nrp-0123abce", booted=1.0)
    pool._write(good)
    pool._write(older)
    (tmp_path / "nrp-0123abcf.json").write_text("{half")
    assert [r.machine for r in pool.records()] == ["nrp-0123abce", "nrp-0123abcd"]
