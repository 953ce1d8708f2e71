from pathlib import Path

import pytest

from nspawn_runner.images import names
from nspawn_runner.images.names import ImageError
from nspawn_runner.settings import Settings


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("bookworm", "bookworm"),
        ("bookworm:latest", "bookworm"),
        ("registry.example/ci/bookworm:latest", "bookworm"),
        ("registry.example:5000/ci/bookworm", "bookworm"),
        ("debian:bookworm", "debian-bookworm"),
        ("debian:12.5", "debian-12.5"),
        ("registry.example/ci/build:2024@sha256:" + "a" * 64, "build-2024"),
        ("  sid  ", "sid"),
    ],
)
def test_reference_mapping(ref: str, name: str) -> None:
    assert names.name_from_reference(ref) == name


@pytest.mark.parametrize(
    "ref",
    ["../../etc", "a/../b", "./x", "-rf", ".hidden", "x;rm -rf /", "a b", "a\\b", "x/", "/abs",
     "bad_name", "x" * 65, "a..b", "trailing.", "café", "a/b:c:d"],
)
def test_invalid_references_are_refused(ref: str) -> None:
    with pytest.raises(ImageError, match="image"):
        names.name_from_reference(ref)


def make_image(root: Path, name: str, init: bool = True) -> Path:
    path = root / "images" / name
    (path / "sbin").mkdir(parents=True)
    if init:
        (path / "sbin" / "init").symlink_to("/lib/systemd/systemd")  # dangling here: fine
    return path


def test_resolve_order(tmp_path: Path) -> None:
    make_image(tmp_path, "a")
    make_image(tmp_path, "b")
    make_image(tmp_path, "c")
    cfg = Settings(root=tmp_path, default_image="c")
    assert names.resolve(cfg, "a", "b")[0] == "a"
    assert names.resolve(cfg, "", "b")[0] == "b"
    assert names.resolve(cfg, "", "")[0] == "c"
    assert names.resolve(cfg, "   ", "")[0] == "c"  # an empty CI_JOB_IMAGE means unset


def test_missing_image_lists_available(tmp_path: Path) -> None:
    make_image(tmp_path, "bookworm")
    (tmp_path / "images" / ".#machine.bookworm1234").mkdir()
    with pytest.raises(ImageError, match=r"'sid' does not exist.*available: bookworm\)"):
        names.resolve(Settings(root=tmp_path), "sid")


def test_no_image_at_all(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no default image"):
        names.resolve(Settings(root=tmp_path), "")


def test_allow_list(tmp_path: Path) -> None:
    make_image(tmp_path, "bookworm")
    make_image(tmp_path, "sid")
    cfg = Settings(root=tmp_path, allowed_images=("book*",))
    assert names.resolve(cfg, "bookworm")[0] == "bookworm"
    with pytest.raises(ImageError, match="'sid' is not allowed.*book\\*"):
        names.resolve(cfg, "sid")


def test_image_without_init(tmp_path: Path) -> None:
    make_image(tmp_path, "empty", init=False)
    with pytest.raises(ImageError, match="no init"):
        names.resolve(Settings(root=tmp_path), "empty")
