"""Files between the developer's checkout and a local job's machine, for `exec`.

In: the project as a shallow clone of HEAD (GIT_DEPTH, 20 by default, as GitLab's fetch) with
the working tree's content on top (tracked files as they are, untracked ones that are not
ignored, deleted ones gone), as one tar the get_sources stage extracts. Out: the job's
artifacts archive, filtered by `artifacts:exclude`, extracted into the working tree by a
process running as the calling user: a job cannot make root write outside what that user may
write, even through symlinks in the checkout (pitfall 16). Both travel through the project's
cache directory, which prepare binds into every machine of the project."""

from __future__ import annotations

import fcntl
import io
import os
import pwd
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nspawn_runner import proc
from nspawn_runner.errors import SystemFailure
from nspawn_runner.local import sources
from nspawn_runner.local.ci_rules import fnmatch_regex


@dataclass(frozen=True)
class Caller:
    """Who asked: under sudo, the user sudo runs for; files we hand back belong to them."""

    uid: int
    gid: int
    name: str
    home: str

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def caller() -> Caller:
    uid, gid = os.getuid(), os.getgid()
    if os.geteuid() == 0 and os.environ.get("SUDO_UID", "").isdigit():
        uid = int(os.environ["SUDO_UID"])
        gid = int(os.environ.get("SUDO_GID", "") or -1)
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise SystemFailure(f"the calling user (uid {uid}) is not in the password database"
                            ) from None
    return Caller(uid, entry.pw_gid if gid < 0 else gid, entry.pw_name, entry.pw_dir)


def next_job_id(state_dir: Path) -> int:
    """A local job id, unique on this host: a counter under the state root, locked."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "last-job-id"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().strip()
        number = int(text) + 1 if text.isdigit() else 1
        f.seek(0)
        f.truncate()
        f.write(f"{number}\n")
    return number


def _git(root: Path, repo: Path, *args: str) -> None:
    proc.run(["git", "-c", f"safe.directory={root}", "-c", "core.fsmonitor=false",
              "-C", str(repo), *args], capture=True)


def source_archive(tree: sources.Tree, predefined: dict[str, str], depth: int,
                   work: Path, archive: Path, remote_url: str | None) -> None:
    """Write the project as the job should see it to `archive` (a tar), using `work`."""
    src = work / "src"
    src.mkdir(parents=True)
    sha = predefined.get("CI_COMMIT_SHA")
    if sha:
        _git(tree.root, src, "init", "-q")
        _git(tree.root, src, "fetch", "-q", "--no-tags",
             *(["--depth", str(depth)] if depth > 0 else []), f"file://{tree.root}",
             "+HEAD:refs/pipelines/local")
        ref = predefined.get("CI_COMMIT_BRANCH")
        if ref:
            _git(tree.root, src, "update-ref", f"refs/remotes/origin/{ref}", sha)
        _git(tree.root, src, "-c", "advice.detachedHead=false", "checkout", "-q", "--detach",
             sha)
        if remote_url:
            _git(tree.root, src, "remote", "add", "origin", remote_url)
    if not tree.tracked_only or not sha:
        # The working tree on top: what git would commit with `git add -A`.
        for entry in src.iterdir():
            if entry.name != ".git":
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        tree.export(src)
    proc.run(["tar", "-c", "-f", str(archive), "-C", str(src), "."])
    shutil.rmtree(src)


def strip_credentials(url: str) -> str:
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        host, _, path = rest.partition("/")
        return f"{scheme}://{host.rpartition('@')[2]}/{path}"
    return url


# ---- artifacts -------------------------------------------------------------------------------

def _members(archive: Path) -> Iterable[tuple[str, tarfile.TarInfo, bytes | None]]:
    """(path, tar header, content) of each entry, from a tar (our helper) or a zip (the real
    gitlab-runner's cache-archiver)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                header = tarfile.TarInfo(info.filename.rstrip("/"))
                mode = (info.external_attr >> 16) & 0o170777
                header.mtime = 0
                if info.is_dir():
                    header.type, header.mode = tarfile.DIRTYPE, mode & 0o777 or 0o755
                    yield header.name, header, None
                elif mode & 0o170000 == 0o120000:
                    header.type, header.linkname = tarfile.SYMTYPE, z.read(info).decode()
                    yield header.name, header, None
                else:
                    data = z.read(info)
                    header.size, header.mode = len(data), mode & 0o777 or 0o644
                    yield header.name, header, data
        return
    with tarfile.open(archive) as t:
        for member in t:
            content: bytes | None = None
            if member.isfile():
                extracted = t.extractfile(member)
                content = extracted.read() if extracted else b""
            yield member.name, member, content


def filter_artifacts(archive: Path, excludes: Sequence[str]) -> tuple[bytes, list[str]]:
    """The archive as a tar without excluded, unsafe or special entries; and the paths kept.
    `excludes` are doublestar patterns relative to the project directory."""
    patterns = [fnmatch_regex(e.strip("/")) for e in excludes]
    out = io.BytesIO()
    kept: list[str] = []
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, header, data in _members(archive):
            path = os.path.normpath(name.removeprefix("./"))
            if path in (".", "") or path.startswith(("/", "../")) or path == "..":
                continue
            if any(p.match(path) for p in patterns):
                continue
            if not (header.isfile() or header.isdir() or header.issym()):
                continue  # no devices, FIFOs or hard links in a developer's checkout
            header.name = path
            if data is not None:
                header.size = len(data)
            header.mode &= 0o777  # never setuid, whatever the job made
            header.uid = header.gid = 0
            header.uname = header.gname = ""
            tar.addfile(header, io.BytesIO(data) if data is not None else None)
            if not header.isdir():
                kept.append(path)
    return out.getvalue(), kept


def extract_as(user: Caller, data: bytes, dest: Path) -> None:
    """Extract a tar into `dest` with `user`'s rights (not root's)."""
    argv = ["tar", "-x", "-f", "-", "-C", str(dest), "--no-same-owner", "--no-same-permissions"]
    mkdir = ["mkdir", "-p", "--", str(dest)]
    if not user.is_root:
        drop = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
                "--reset-env", "--"]
        argv, mkdir = drop + argv, drop + mkdir
    proc.run(mkdir)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        proc.run(argv, stdin=f)


def as_format_of(original: Path, data: bytes) -> bytes:
    """`data` (a tar) as a zip when `original` was one: what the machine's gitlab-runner
    helper extracts for a later job is what it archived."""
    if not zipfile.is_zipfile(original):
        return data
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as t, zipfile.ZipFile(out, "w") as z:
        for member in t:
            info = zipfile.ZipInfo(member.name + ("/" if member.isdir() else ""))
            kind = 0o040000 if member.isdir() else 0o120000 if member.issym() else 0o100000
            info.external_attr = (kind | member.mode) << 16
            if member.issym():
                z.writestr(info, member.linkname)
            elif member.isfile():
                extracted = t.extractfile(member)
                z.writestr(info, extracted.read() if extracted else b"")
            else:
                z.writestr(info, b"")
    return out.getvalue()


def store(data: bytes, path: Path) -> None:
    """Keep a job's artifacts for later local jobs that depend on it (replacing the last)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
