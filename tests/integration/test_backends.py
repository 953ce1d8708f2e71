"""What only some backends do."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOTS, Driver, settled_leftovers


@pytest.fixture
def volatile(tmp_path: Path) -> Driver:
    d = Driver("volatile", Path(ROOTS["volatile"][0]), tmp_path / "config.toml")
    d.write_settings()
    return d


def test_volatile_backend(volatile: Driver) -> None:
    result = volatile.run(volatile.job(["echo volatile > /etc/v", "findmnt -n -o FSTYPE /"]))
    assert result.status == "success", result.log
    assert "(volatile backend)" in result.log
    assert not (volatile.root / "images" / "bookworm" / "etc" / "v").exists()
    assert not settled_leftovers(volatile.root)


def test_overlay_upper_dir_is_removed(tmp_path: Path) -> None:
    d = Driver("overlay", Path(ROOTS["overlay"][0]), tmp_path / "config.toml")
    d.write_settings()
    job = d.job(["touch /root/x", "ls -d /var/lib/nspawn-runner 2>/dev/null || echo no-root"])
    result = d.run(job)
    assert result.status == "success", result.log
    assert not settled_leftovers(d.root)
    assert not (d.root / "overlays").exists() or not any((d.root / "overlays").iterdir())
