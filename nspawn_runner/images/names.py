"""Base images: plain directories or btrfs subvolumes under <root>/images/<NAME>. Whatever an
admin places there is usable as `image: NAME`; there is no registration step."""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from nspawn_runner import schema
from nspawn_runner.errors import SystemFailure
from nspawn_runner.settings import Settings

# Valid as a machine/host name label sequence: systemd refuses anything else as a machine name.
_IMAGE_NAME = schema.IMAGE_NAME
_REF_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")
NAME_RULE = schema.IMAGE_NAME_RULE


class ImageError(SystemFailure):
    pass


def name_from_reference(ref: str) -> str:
    """Map a job's `image:` to an image name.

    `registry.example:5000/ci/bookworm:latest` -> `bookworm`; `debian:bookworm` ->
    `debian-bookworm`; a digest (`@sha256:...`) is ignored. Path components are checked, so
    `../../etc` is refused instead of quietly becoming `etc`."""
    text = ref.strip()
    path = text.split("@", 1)[0]
    parts = path.split("/")
    if not path or not all(_REF_COMPONENT.match(p) and p not in (".", "..") for p in parts):
        raise ImageError(f"invalid image {ref!r}: use an image name ({NAME_RULE}), optionally "
                         "with a registry path and tag, e.g. registry.example/ci/bookworm:latest")
    name, _, tag = parts[-1].partition(":")
    if tag and tag != "latest":
        name = f"{name}-{tag}"
    validate_name(name, f"invalid image {ref!r} (it maps to the image name {name!r})")
    return name


def validate_name(name: str, context: str = "") -> None:
    if not _IMAGE_NAME.match(name):
        raise ImageError(f"{context or f'invalid image name {name!r}'}: image names may contain "
                         f"{NAME_RULE}")


def available(settings: Settings) -> list[str]:
    try:
        entries = os.scandir(settings.images_dir)
    except OSError:
        return []
    with entries:
        return sorted(e.name for e in entries
                      if e.is_dir(follow_symlinks=False) and _IMAGE_NAME.match(e.name))


def resolve(settings: Settings, job_image: str, default_image: str = "") -> tuple[str, Path]:
    """The image a job runs on: its own `image:`, else --default-image, else the settings'."""
    if job_image.strip():
        name = name_from_reference(job_image)
    elif default_image or settings.default_image:
        name = default_image or settings.default_image
        validate_name(name, f"invalid default image {name!r}")
    else:
        raise ImageError("the job names no image and no default image is set: add `image:` to "
                         "the job, or pass --default-image in prepare_args, or set default_image "
                         "in the settings file")
    if settings.allowed_images and not any(
        fnmatch.fnmatchcase(name, pattern) for pattern in settings.allowed_images
    ):
        raise ImageError(f"image {name!r} is not allowed on this runner (allowed_images: "
                         f"{', '.join(settings.allowed_images)}); use one of those")
    path = settings.images_dir / name
    if not path.is_dir():
        have = ", ".join(available(settings)) or "none"
        raise ImageError(f"image {name!r} does not exist in {settings.images_dir} (available: "
                         f"{have}); use one of those or create it")
    # sbin/init is usually an absolute symlink: test it as a link, not through the host's /.
    if not any(os.path.lexists(path / p) for p in
               ("sbin/init", "usr/sbin/init", "usr/lib/systemd/systemd", "lib/systemd/systemd")):
        raise ImageError(f"image {name!r} ({path}) has no init, so it cannot boot: install "
                         "systemd and systemd-sysv in it")
    return name, path
