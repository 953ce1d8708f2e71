"""The image commands: chroot-create, chroot-login, chroot-maintenance, chroot-list,
chroot-remove, chroot-export and chroot-import. Each makes a new version aside and swaps it in
(images/store.py), so jobs never see a half-made image and keep the version they booted."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from nspawn_runner import log, proc, table
from nspawn_runner.errors import Cancelled, NspawnRunnerError, SystemFailure
from nspawn_runner.host import backends, fs
from nspawn_runner.images import build, names, store, transport
from nspawn_runner.images import spec as image_file
from nspawn_runner.images.spec import ImageSpec
from nspawn_runner.images.store import InUse
from nspawn_runner.progress import Step, run_tool, wait
from nspawn_runner.settings import Settings


def _spec(settings: Settings, name: str,
          overrides: Mapping[str, object] | None = None) -> ImageSpec:
    spec = image_file.load(settings, name, overrides)
    if spec is None:
        raise image_file.ImageFileError(
            f"image {name!r} has no image file {image_file.path_of(settings, name)}: write one "
            "(see docs/images.md and examples/images/), or give at least --suite")
    return spec


@contextmanager
def _aside(path: Path) -> Iterator[Path]:
    """`path`, a version being made: removed unless the block completes (a failed or
    interrupted run leaves nothing behind)."""
    try:
        yield path
    except BaseException:
        try:
            fs.remove_tree(path)
        except Exception as e:  # keep the original error; prune_old_versions retries later
            log.warn(f"could not remove {path}: {e}")
        raise


def _swap(settings: Settings, name: str, new: Path, in_use: InUse) -> None:
    old = store.swap_in(settings, name, new)
    store.prune_old_versions(settings, in_use())
    if old is not None and os.path.lexists(old):
        log.info(f"the previous version of {name!r} stays in {old} until its jobs end")


def _build(settings: Settings, spec: ImageSpec) -> Path:
    """A complete new version of `spec`'s image, made aside."""
    with _aside(store.new_empty(settings, spec.name)) as new:
        build.bootstrap(settings, spec, new)
        build.provision(settings, spec, new)
        build.finalize(spec.name, new, spec.hostname or spec.name)
        build.verify(spec, spec.name, new)
        now = time.time()
        store.write_meta(new, name=spec.name, created=now, maintained=now,
                              recipe=spec.recipe(), bootstrap=spec.bootstrap,
                              suite=spec.suite, architecture=build.architecture(spec)
                              if spec.debian else spec.architecture)
    return new


def _reprovision(settings: Settings, spec: ImageSpec) -> Path:
    """A copy of the current version with the file's provisioning run again."""
    with _aside(store.new_copy(settings, spec.name)) as new:
        build.provision(settings, spec, new)
        build.finalize(spec.name, new, spec.hostname or spec.name)
        build.verify(spec, spec.name, new)
        store.write_meta(new, maintained=time.time())
    return new


def create(settings: Settings, name: str, in_use: InUse,
           overrides: Mapping[str, object] | None = None, save: bool = False) -> None:
    """Build image `name` from its file (with `overrides`) and put it in place."""
    start = time.monotonic()
    spec = _spec(settings, name, overrides)
    with store.lock(settings, name, f"chroot-create {name}"):
        _swap(settings, name, _build(settings, spec), in_use)
    path = image_file.path_of(settings, name)
    if overrides and (save or not path.exists()):
        image_file.save(path, overrides)
        log.info(f"wrote {path}")
    log.info(f"image {name!r} ready in {time.monotonic() - start:.1f}s")


@dataclass
class Outcome:
    name: str
    action: str = ""
    error: str = ""
    seconds: float = 0.0


def _maintain_one(settings: Settings, name: str, in_use: InUse) -> str:
    spec = _spec(settings, name)
    with store.lock(settings, name, f"chroot-maintenance {name}"):
        path = store.image_path(settings, name)
        if not path.is_dir():
            _swap(settings, name, _build(settings, spec), in_use)
            return "created"
        meta = store.read_meta(path)
        created = meta.get("created")
        if spec.recreate_after and (not isinstance(created, int | float)
                                    or time.time() - created > spec.recreate_after):
            _swap(settings, name, _build(settings, spec), in_use)
            return f"recreated (older than {_duration(spec.recreate_after)})"
        if meta.get("recipe") not in (None, spec.recipe()):
            _swap(settings, name, _build(settings, spec), in_use)
            return "recreated (file changed)"
        if not spec.provisioned:
            return "up to date (nothing to run)"
        _swap(settings, name, _reprovision(settings, spec), in_use)
        return "provisioned"


def maintenance(settings: Settings, names: Sequence[str], in_use: InUse) -> list[Outcome]:
    """Bring every image with a file (or the named ones) up to date. One failing image does
    not stop the others; the summary says which failed."""
    todo = list(names) or image_file.names(settings)
    if not todo:
        log.info(f"no image files in {settings.images_config_dir}: nothing to maintain")
    store.prune_old_versions(settings, in_use())
    outcomes = []
    for name in todo:
        outcome = Outcome(name)
        start = time.monotonic()
        log.info(f"== {name}")
        try:
            outcome.action = _maintain_one(settings, name, in_use)
        except Cancelled:
            raise
        except NspawnRunnerError as e:
            outcome.error = str(e)
        except Exception as e:  # a bug with one image must not keep the others old
            outcome.error = f"internal error: {e!r}"
        outcome.seconds = time.monotonic() - start
        if outcome.error:
            log.error(f"{name}: {outcome.error}")
        outcomes.append(outcome)
    return outcomes


def maintenance_report(outcomes: Sequence[Outcome], colour: bool = False) -> str:
    """The summary table of chroot-maintenance and chroot-sync; FAILED in red with `colour`."""
    rows = [("IMAGE", "RESULT", "TIME", "")]
    for o in outcomes:
        rows.append((o.name, "FAILED" if o.error else o.action, f"{o.seconds:.1f}s",
                     _first_line(o.error)))
    text = table.render(rows)
    return table.paint_column(text, 1, {"FAILED": "error"}) if colour else text


def check_outcomes(outcomes: Sequence[Outcome], what: str = "maintenance") -> None:
    failed = [o.name for o in outcomes if o.error]
    if failed:
        raise SystemFailure(f"{what} failed for {len(failed)} of {len(outcomes)} images: "
                            f"{', '.join(failed)} (their previous versions are unchanged)")


def existing(settings: Settings, name: str) -> Path:
    """The current version of image `name`, checked before any lock or directory is made (or
    a question asked)."""
    path = store.image_path(settings, name)
    if not path.is_dir():
        raise names.ImageError(f"image {name!r} does not exist in {settings.images_dir}; "
                               "`nspawn-runner chroot-list` shows the images there are")
    return path


def login(settings: Settings, name: str, command: Sequence[str], in_use: InUse) -> None:
    """A root shell (or `command`) in a copy of image `name`; the copy replaces the image if
    it exits with status 0 and is discarded otherwise."""
    spec = image_file.load(settings, name)
    existing(settings, name)
    cache = build.package_cache(settings, spec) if spec else None
    interactive = not command and sys.stdin.isatty() and sys.stdout.isatty()
    with store.lock(settings, name, f"chroot-login {name}"):
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
        with _aside(store.new_copy(settings, name)) as copy:
            log.info(f"chroot-login: changes go to a copy of {name!r}; they replace the image "
                     "when the shell exits with status 0, otherwise they are discarded")
            argv = build.nspawn_command(spec, name, copy, command, cache, interactive)
            code = wait(proc.spawn(argv, stdin=None))
            if code != 0:
                raise SystemFailure(f"chroot-login: the shell exited with status {code}: the "
                                    f"changes were discarded, image {name!r} is unchanged")
            build.finalize(name, copy, None)
            build.verify(spec, name, copy)
            store.write_meta(copy, maintained=time.time())
        _swap(settings, name, copy, in_use)
    log.info(f"chroot-login: image {name!r} updated")


def remove(settings: Settings, name: str, in_use: InUse, force: bool = False) -> None:
    existing(settings, name)
    with store.lock(settings, name, f"chroot-remove {name}"):
        path = existing(settings, name)
        users = [u.machine for u in in_use() if u.image == name]
        if users and not force:
            raise store.ImageBusy(
                f"image {name!r} is used by {len(users)} running job(s) ({', '.join(users)}); "
                "retry when they have ended, or use --force (they keep running on it)")
        os.rename(path, path.with_name(f"{store.OLD_PREFIX}{name}@{int(time.time())}-rm"))
        store.prune_old_versions(settings, in_use())
    log.info(f"image {name!r} removed")
    if image_file.path_of(settings, name).exists():
        log.info(f"its file {image_file.path_of(settings, name)} remains: chroot-maintenance "
                 "creates the image again unless you delete it")


def export(settings: Settings, name: str, dest: Path, sign: bool = False,
           key: str = "") -> Path:
    """Image `name` as a tarball systemd's importer reads (transport.FORMATS: DEST/NAME.tar.xz
    if `dest` is a directory), with ownership, permissions, ACLs and xattrs, and its line in
    the SHA256SUMS beside it (signed into SHA256SUMS.gpg with `sign`). Returns the tarball."""
    path = existing(settings, name)
    dest = dest.absolute()
    if dest.is_dir():
        dest = dest / f"{name}{transport.DEFAULT_FORMAT}"
    fmt = transport.format_of(dest.name)
    if not dest.parent.is_dir():
        raise SystemFailure(f"{dest.parent} is not a directory: create it, or export elsewhere")
    partial = dest.with_name(f".{dest.name}.partial")
    with store.lock(settings, name, f"chroot-export {name}"), Step(f"export to {dest}"):
        try:
            build.archive(path, partial, fmt)
            digest = transport.sha256_file(partial)
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)
        sums = transport.update_sums(dest.parent, dest.name, digest)
        if sign:
            transport.sign(dest.parent, key)
    log.info(f"image {name!r} exported to {dest} ({_size(dest.stat().st_size)}); {sums} lists "
             f"it{' and ' + transport.SIGNATURE + ' signs that' if sign else ''}")
    return dest


def _import_locked(settings: Settings, name: str, source: str, expected: str | None,
                   sums_source: str, spec: ImageSpec | None, in_use: InUse) -> None:
    """Download (or read), check against `expected`, unpack aside, check, swap in: with the
    image's lock held."""
    with _aside(store.new_empty(settings, name)) as new:
        with transport.fetched(source, settings.images_dir, name) as (archive, digest):
            if expected is not None:
                transport.check_digest(digest, expected, source, sums_source)
            with Step(f"unpack {transport.public(source)}"):
                build.extract(archive, new)
        with Step("check that it is a complete image and runs"):
            build.verify(None, name, new)
            run_tool(build.nspawn_command(spec, name, new, ["/bin/true"]))
        build.finalize(name, new, None)
        # Never the credentials of a URL: every job can read this file.
        store.write_meta(new, name=name, imported=time.time(),
                         imported_from=transport.public(source), imported_sha256=digest)
    _swap(settings, name, new, in_use)


def import_(settings: Settings, name: str, source: str, in_use: InUse, verify: str = "auto",
            keyring: Path = transport.DEFAULT_KEYRING) -> None:
    """Image `name` from a tarball (path or URL), checked against the SHA256SUMS beside it
    (and its signature, as `verify` says) before anything is unpacked; then unpacked aside,
    checked to be complete and to run, and only then swapped in."""
    names.validate_name(name)
    start = time.monotonic()
    sums_source = transport.beside(source, transport.SUMS)
    sums = transport.checked_sums(sums_source, verify, keyring)
    expected = transport.expected_digest(sums, source, sums_source) if sums is not None \
        else None
    spec = image_file.load(settings, name)
    with store.lock(settings, name, f"chroot-import {name}"):
        _import_locked(settings, name, source, expected, sums_source, spec, in_use)
    log.info(f"image {name!r} imported in {time.monotonic() - start:.1f}s")


def sync(settings: Settings, url: str, in_use: InUse, only: Sequence[str] = (),
         verify: str = "auto", keyring: Path = transport.DEFAULT_KEYRING) -> list[Outcome]:
    """Every image the SHA256SUMS at `url` lists (or the `only` ones): those whose tarball
    changed since they were last synced are imported and swapped in atomically, the others
    are left alone. One failing image does not stop the others."""
    for name in only:
        names.validate_name(name)
    index = transport.index_of(url)
    sums = transport.checked_sums(index, "checksum" if verify == "no" else verify, keyring)
    assert sums is not None
    listed = {image: filename for filename in sums
              if (image := transport.image_of(filename)) is not None}
    missing = [n for n in only if n not in listed]
    if missing:
        raise transport.TransportError(
            f"{transport.public(index)} lists no image {', '.join(map(repr, missing))} (it lists: "
            f"{', '.join(sorted(listed)) or 'none'})")
    if not listed:
        log.info(f"{transport.public(index)} lists no image tarballs: nothing to sync")
    outcomes = []
    for name in sorted(set(only) if only else listed):
        outcome = Outcome(name)
        start = time.monotonic()
        filename = listed[name]
        try:
            outcome.action = _sync_one(settings, name, index, filename, sums[filename], in_use)
        except Cancelled:
            raise
        except NspawnRunnerError as e:
            outcome.error = str(e)
        outcome.seconds = time.monotonic() - start
        if outcome.error:
            log.error(f"{name}: {outcome.error}")
        outcomes.append(outcome)
    return outcomes


def _sync_one(settings: Settings, name: str, index: str, filename: str, digest: str,
              in_use: InUse) -> str:
    path = store.image_path(settings, name)
    if path.is_dir() and store.read_meta(path).get("imported_sha256") == digest:
        return "up to date"
    action = "updated" if path.is_dir() else "created"
    spec = image_file.load(settings, name)
    with store.lock(settings, name, f"chroot-sync {name}"):
        _import_locked(settings, name, transport.beside(index, filename), digest, index, spec,
                       in_use)
    return action


def outcomes_json(outcomes: Sequence[Outcome]) -> list[dict[str, object]]:
    """What `chroot-maintenance --json` and `chroot-sync --json` print (what monitoring reads)."""
    return [{"name": o.name, "ok": not o.error, "action": o.action or None,
             "error": o.error or None, "seconds": round(o.seconds, 1)} for o in outcomes]


def list_images(settings: Settings, in_use: InUse) -> list[dict[str, object]]:
    on_disk = set(names.available(settings))
    backend = backends.choose(settings.backend, settings.root).value \
        if settings.images_dir.is_dir() else ""
    old: dict[str, int] = {}
    if settings.images_dir.is_dir():
        for entry in settings.images_dir.iterdir():
            if entry.name.startswith(store.OLD_PREFIX):
                owner = entry.name[len(store.OLD_PREFIX):].rpartition("@")[0]
                old[owner] = old.get(owner, 0) + 1
    uses = in_use()
    rows: list[dict[str, object]] = []
    for name in sorted(on_disk | set(image_file.names(settings))):
        path = settings.images_dir / name
        meta = store.read_meta(path) if name in on_disk else {}
        file = image_file.path_of(settings, name)
        rows.append({
            "name": name,
            "exists": name in on_disk,
            "path": str(path),
            "file": str(file) if file.exists() else None,
            "size": store.size(path) if name in on_disk else None,
            "created": _iso(meta.get("created")),
            "maintained": _iso(meta.get("maintained")),
            "imported": _iso(meta.get("imported")),
            "backend": backend if name in on_disk else None,
            "subvolume": fs.is_subvolume(path) if name in on_disk else None,
            "jobs": [u.machine for u in uses if u.image == name],
            "old_versions": old.get(name, 0),
        })
    return rows


def list_report(rows: Sequence[Mapping[str, object]]) -> str:
    lines = [("NAME", "SIZE", "CREATED", "MAINTAINED", "BACKEND", "JOBS")]
    for r in rows:
        jobs = r["jobs"]
        assert isinstance(jobs, list)
        old = int(str(r["old_versions"]))
        lines.append((
            str(r["name"]),
            _size(r["size"]) if r["exists"] else "(missing)",
            _short_time(r["created"] or r["imported"]),
            _short_time(r["maintained"]),
            str(r["backend"] or "-"),
            str(len(jobs)) + (f" (+{old} old version{'s' if old > 1 else ''})" if old else ""),
        ))
    return table.render(lines)


def _duration(seconds: int) -> str:
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _iso(value: object) -> str | None:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value).astimezone().isoformat(timespec="seconds")
    return None


def _short_time(value: object) -> str:
    return str(value)[:16].replace("T", " ") if value else "-"


def _size(value: object) -> str:
    if not isinstance(value, int):
        return "?"
    size = float(value)
    for unit in ("B", "K", "M", "G"):
        if size < 1024:
            return f"{size:.0f}{unit}"
        size /= 1024
    return f"{size:.1f}T"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""

