"""What the local repository gives a local job: its files as git sees them, and the predefined
CI/CD variables GitLab would set for a push of the current branch.

The files are the tracked ones with their working-tree content plus the untracked ones that
are not ignored (`git ls-files --cached --others --exclude-standard`): what `git add -A` would
commit. With `tracked_only`, the committed tree of HEAD. Local runners that copy only committed
files are the most frequent complaint about them (pitfalls.md 20).

Every variable comes from the repository (HEAD, the branch, the remote URL, the commit); what
the repository cannot tell (a pipeline id, a server version) is left unset, never invented."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from nspawn_runner import proc
from nspawn_runner.errors import CommandError, SystemFailure
from nspawn_runner.local.ci_variables import slugify

NO_SHA = "0" * 40  # GitLab's CI_COMMIT_BEFORE_SHA when there is no previous push


def _git(root: Path, *args: str, check: bool = True) -> str:
    # safe.directory: under sudo, git refuses a repository its user does not own. fsmonitor:
    # a repository's config must not make us (perhaps root) run one of its programs.
    argv = ["git", "-c", f"safe.directory={root}", "-c", "core.fsmonitor=false",
            "-c", "core.quotePath=false", "-C", str(root), *args]
    result = proc.run(argv, capture=True, check=check)
    return result.stdout if result.returncode == 0 else ""


def toplevel(directory: Path) -> Path:
    """The top of the git working tree holding `directory`."""
    if not directory.is_dir():
        raise SystemFailure(f"{directory} is not a directory: pass -C with the project's "
                            "checkout")
    try:
        out = _git(directory.resolve(), "rev-parse", "--show-toplevel")
    except CommandError as e:
        if e.returncode == 127:
            raise SystemFailure("git is not installed: apt-get install git") from None
        raise SystemFailure(f"{directory} is not in a git repository: exec copies the project "
                            "as git sees it; run it in a checkout (or git init and commit)"
                            ) from None
    return Path(out.strip())


@dataclass(frozen=True)
class Tree:
    """The project's files (implements ci_loader.ProjectFiles)."""

    root: Path
    tracked_only: bool
    files: tuple[str, ...]  # repository-relative POSIX paths of files and symlinks
    submodules: tuple[str, ...] = ()  # gitlinks: left empty, as GIT_SUBMODULE_STRATEGY=none
    _index: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def paths(self) -> Sequence[str]:
        return self.files

    def read(self, path: str) -> bytes | None:
        path = path.lstrip("/")
        if path not in self._index:
            return None
        if self.tracked_only:
            blob = proc.run(["git", "-c", f"safe.directory={self.root}", "-C", str(self.root),
                             "cat-file", "blob", f"HEAD:{path}"], capture=True, check=False)
            return blob.stdout.encode() if blob.returncode == 0 else None
        try:
            return (self.root / path).read_bytes()
        except OSError:
            return None

    def export(self, dest: Path) -> int:
        """Copy the files into `dest` (which must exist and be empty), keeping modes and
        symlinks. Returns the number of entries written."""
        if self.tracked_only:
            return self._export_head(dest)
        count = 0
        for path in self.files:
            source, target = self.root / path, dest / path
            if source.is_symlink():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.readlink(source), target)
            elif source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
            else:
                continue  # deleted in the working tree: deleted in the copy too
            count += 1
        for path in self.submodules:
            (dest / path).mkdir(parents=True, exist_ok=True)
        return count

    def _export_head(self, dest: Path) -> int:
        with tempfile.TemporaryDirectory(prefix="nspawn-runner-archive-") as tmp:
            archive = Path(tmp) / "head.tar"
            _git(self.root, "archive", "--format=tar", "-o", str(archive), "HEAD")
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.isfile() or m.issym()]
                # Our own archive of the repository: its symlinks may point anywhere, as in
                # a clone ("data" would refuse those). Debian's 3.11.2 has no filters.
                if hasattr(tarfile, "fully_trusted_filter"):
                    tar.extractall(dest, filter="fully_trusted")
                else:
                    tar.extractall(dest)
        for path in self.submodules:
            (dest / path).mkdir(parents=True, exist_ok=True)
        return len(members)


def _split_z(text: str) -> list[str]:
    return [p for p in text.split("\0") if p]


def tree(root: Path, *, tracked_only: bool = False) -> Tree:
    stage = _git(root, "ls-files", "-z", "--stage")
    submodules = tuple(entry.split("\t", 1)[1] for entry in _split_z(stage)
                       if entry.startswith("160000 "))
    if tracked_only:
        if not _git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False):
            raise SystemFailure(f"{root} has no commit yet: --tracked-only runs the committed "
                                "files; commit first, or leave --tracked-only out")
        listing = _split_z(_git(root, "ls-tree", "-r", "-z", "--full-tree", "HEAD"))
        files = [e.split("\t", 1)[1] for e in listing if not e.startswith("160000 ")]
        submodules = tuple(e.split("\t", 1)[1] for e in listing if e.startswith("160000 "))
    else:
        listed = _split_z(_git(root, "ls-files", "-z", "--cached", "--others",
                               "--exclude-standard"))
        skip = set(submodules)
        files = [p for p in dict.fromkeys(listed) if p not in skip and (
            (root / p).is_symlink() or (root / p).is_file())]
    ordered = tuple(sorted(files))
    return Tree(root, tracked_only, ordered, submodules, frozenset(ordered))


# ---- predefined variables ---------------------------------------------------------------------

@dataclass(frozen=True)
class Remote:
    host: str  # with the port when the URL names one
    path: str  # group/subgroup/project
    scheme: str  # for web URLs: https unless the remote is plain http


_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>[^/].*)$")


def parse_remote(url: str) -> Remote | None:
    """`git@gitlab.example.com:group/project.git`, `https://host/group/project.git`,
    `ssh://git@host:2222/group/project`. None for local paths and file:// URLs."""
    url = url.strip()
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ssh", "git") or not parts.hostname:
            return None
        host = parts.hostname
        if parts.port and parts.scheme in ("http", "https"):
            host = f"{host}:{parts.port}"
        path = parts.path
        scheme = "http" if parts.scheme == "http" else "https"
    else:
        m = _SCP_LIKE.match(url)
        if not m or url.startswith("/"):
            return None
        host, path, scheme = m.group("host"), m.group("path"), "https"
    path = path.strip("/").removesuffix(".git").strip("/")
    return Remote(host, path, scheme) if "/" in path else None


def remote_url(root: Path, branch: str | None) -> str | None:
    names = _git(root, "remote").split()
    if not names:
        return None
    preferred = _git(root, "config", f"branch.{branch}.remote", check=False).strip() \
        if branch else ""
    name = preferred if preferred in names else "origin" if "origin" in names else names[0]
    return _git(root, "remote", "get-url", name, check=False).strip() or None


def _default_branch(root: Path) -> str | None:
    ref = _git(root, "symbolic-ref", "--quiet", "refs/remotes/origin/HEAD", check=False)
    if ref.strip():
        return ref.strip().removeprefix("refs/remotes/origin/")
    for candidate in filter(None, [_git(root, "config", "init.defaultBranch",
                                        check=False).strip(), "main", "master"]):
        if _git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{candidate}",
                check=False).strip():
            return candidate
    return None


@dataclass(frozen=True)
class Predefined:
    variables: dict[str, str]
    notes: tuple[str, ...]


def predefined(root: Path, *, config_path: str = ".gitlab-ci.yml",
               builds_dir: str | None = None) -> Predefined:
    """The variables GitLab predefines for a push pipeline of HEAD's branch (or tag)."""
    notes: list[str] = []
    v: dict[str, str] = {"CI": "true", "GITLAB_CI": "true", "CI_PIPELINE_SOURCE": "push",
                         "CI_CONFIG_PATH": config_path}
    sha = _git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False).strip()
    branch = _git(root, "symbolic-ref", "--quiet", "--short", "HEAD", check=False).strip() or None
    tag = None
    if branch is None and sha:
        tags = _git(root, "tag", "--points-at", "HEAD", check=False).split()
        tag = sorted(tags)[0] if tags else None
    ref = branch or tag or sha
    if branch:
        v["CI_COMMIT_BRANCH"] = branch
    elif tag:
        v["CI_COMMIT_TAG"] = tag
        message = _git(root, "tag", "-l", "--format=%(contents)", tag, check=False).rstrip("\n")
        if message:
            v["CI_COMMIT_TAG_MESSAGE"] = message
    else:
        notes.append("HEAD is detached and no tag points at it: CI_COMMIT_REF_NAME is the "
                     "commit SHA and neither CI_COMMIT_BRANCH nor CI_COMMIT_TAG is set")
    if ref:
        v["CI_COMMIT_REF_NAME"] = ref
        v["CI_COMMIT_REF_SLUG"] = slugify(ref)
    if sha:
        fields = _git(root, "log", "-1", "--format=%an%x00%ae%x00%cI%x00%B", "HEAD")
        name, email, stamp, message = fields.split("\0", 3)
        message = message.rstrip("\n")
        title = message.split("\n", 1)[0]
        v |= {"CI_COMMIT_SHA": sha, "CI_COMMIT_SHORT_SHA": sha[:8],
              "CI_COMMIT_BEFORE_SHA": NO_SHA, "CI_COMMIT_MESSAGE": message,
              "CI_COMMIT_TITLE": title,
              # GitLab: the message without its title when the title is under 100 characters.
              "CI_COMMIT_DESCRIPTION": (message.split("\n", 1)[1].lstrip("\n")
                                        if "\n" in message else "") if len(title) < 100
              else message,
              "CI_COMMIT_AUTHOR": f"{name} <{email}>", "CI_COMMIT_TIMESTAMP": stamp}
    else:
        notes.append("the repository has no commit yet: no CI_COMMIT_SHA and friends")
    default = _default_branch(root)
    if default:
        v["CI_DEFAULT_BRANCH"] = default
        # GitLab protects the default branch of a new project, and nothing else.
        v["CI_COMMIT_REF_PROTECTED"] = "true" if ref == default else "false"
    url = remote_url(root, branch)
    remote = parse_remote(url) if url else None
    if remote:
        path = remote.path
        namespace = path.rsplit("/", 1)[0]
        server = f"{remote.scheme}://{remote.host}"
        v |= {"CI_PROJECT_NAMESPACE": namespace, "CI_PROJECT_ROOT_NAMESPACE":
              path.split("/", 1)[0], "CI_PROJECT_URL": f"{server}/{path}",
              "CI_SERVER_URL": server, "CI_SERVER_HOST": remote.host.split(":")[0],
              "CI_SERVER_FQDN": remote.host, "CI_SERVER_PROTOCOL": remote.scheme}
        if ":" in remote.host:
            v["CI_SERVER_PORT"] = remote.host.rsplit(":", 1)[1]
    else:
        path = root.name
        notes.append(f"no GitLab remote{f' ({url})' if url else ''}: CI_PROJECT_PATH is the "
                     f"directory name {path!r} and CI_PROJECT_NAMESPACE is not set")
    v |= {"CI_PROJECT_PATH": path, "CI_PROJECT_NAME": path.rsplit("/", 1)[-1],
          "CI_PROJECT_PATH_SLUG": slugify(path)}
    if builds_dir is not None:
        v["CI_PROJECT_DIR"] = f"{builds_dir.rstrip('/')}/{path}"
        v["CI_BUILDS_DIR"] = builds_dir
    user = _git(root, "config", "user.name", check=False).strip()
    email = _git(root, "config", "user.email", check=False).strip()
    if user:
        v["GITLAB_USER_NAME"] = user
    if email:
        v["GITLAB_USER_EMAIL"] = email
    v["CI_PIPELINE_CREATED_AT"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Predefined(v, tuple(notes))
