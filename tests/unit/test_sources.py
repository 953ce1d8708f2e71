"""sources.py on real temporary git repositories: the files a local job gets, and the
predefined variables derived from the repository."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nspawn_runner.errors import SystemFailure
from nspawn_runner.local import ci_yaml, sources

ENV = {"GIT_AUTHOR_NAME": "Ada Lovelace", "GIT_AUTHOR_EMAIL": "ada@example.com",
       "GIT_COMMITTER_NAME": "Ada Lovelace", "GIT_COMMITTER_EMAIL": "ada@example.com",
       "GIT_AUTHOR_DATE": "2024-05-01T12:00:00+02:00",
       "GIT_COMMITTER_DATE": "2024-05-01T12:00:00+02:00", "HOME": "/nonexistent",
       "GIT_CONFIG_NOSYSTEM": "1", "PATH": os.environ["PATH"]}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=ENV).stdout


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "webapp"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / ".gitignore").write_text("build/\n*.log\n")
    (root / ".gitlab-ci.yml").write_text("include: ci/jobs.yml\n")
    (root / "ci").mkdir()
    (root / "ci/jobs.yml").write_text("test: {script: [make test]}\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "gone.txt").write_text("deleted later\n")
    os.symlink("run.sh", root / "link")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "Add the pipeline\n\nWith a body line.")
    # Working-tree state: modified, untracked, ignored, deleted
    (root / "ci/jobs.yml").write_text("test: {script: [make check]}\n")
    (root / "new.txt").write_text("untracked\n")
    (root / "build").mkdir()
    (root / "build/out.o").write_text("ignored\n")
    (root / "debug.log").write_text("ignored\n")
    (root / "gone.txt").unlink()
    return root


def test_working_tree_as_git_sees_it(repo: Path, tmp_path: Path) -> None:
    t = sources.tree(repo)
    assert t.paths() == (".gitignore", ".gitlab-ci.yml", "ci/jobs.yml", "link", "new.txt",
                         "run.sh")
    assert t.read("ci/jobs.yml") == b"test: {script: [make check]}\n"
    assert t.read("/ci/jobs.yml") == b"test: {script: [make check]}\n"
    assert t.read("debug.log") is None  # ignored: not part of the project
    dest = tmp_path / "copy"
    dest.mkdir()
    assert t.export(dest) == 6
    assert (dest / "new.txt").read_text() == "untracked\n"
    assert not (dest / "build").exists() and not (dest / "gone.txt").exists()
    assert os.readlink(dest / "link") == "run.sh"
    assert os.stat(dest / "run.sh").st_mode & 0o111


def test_tracked_only_is_the_committed_tree(repo: Path, tmp_path: Path) -> None:
    t = sources.tree(repo, tracked_only=True)
    assert t.paths() == (".gitignore", ".gitlab-ci.yml", "ci/jobs.yml", "gone.txt", "link",
                         "run.sh")
    assert t.read("ci/jobs.yml") == b"test: {script: [make test]}\n"
    assert t.read("new.txt") is None
    dest = tmp_path / "copy"
    dest.mkdir()
    assert t.export(dest) == 6
    assert (dest / "gone.txt").read_text() == "deleted later\n"
    assert (dest / "ci/jobs.yml").read_text() == "test: {script: [make test]}\n"
    assert os.readlink(dest / "link") == "run.sh" and os.stat(dest / "run.sh").st_mode & 0o111
    assert not (dest / "new.txt").exists()


def test_includes_are_read_from_the_tree(repo: Path) -> None:
    t = sources.tree(repo)
    text = (repo / ".gitlab-ci.yml").read_text()
    p = ci_yaml.load(text, files=t, predefined={})
    assert ci_yaml.resolve_job(p, "test").script == ("make check",)
    committed = sources.tree(repo, tracked_only=True)
    p = ci_yaml.load(text, files=committed, predefined={})
    assert ci_yaml.resolve_job(p, "test").script == ("make test",)


def test_toplevel_from_a_subdirectory_and_outside_git(repo: Path, tmp_path: Path) -> None:
    assert sources.toplevel(repo / "ci") == repo
    outside = tmp_path / "plain"
    outside.mkdir()
    with pytest.raises(SystemFailure, match="not in a git repository"):
        sources.toplevel(outside)


def test_tracked_only_without_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    git(tmp_path, "init", "-q")
    with pytest.raises(SystemFailure, match="no commit yet"):
        sources.tree(tmp_path, tracked_only=True)


def test_predefined_variables_of_a_branch_push(repo: Path) -> None:
    git(repo, "remote", "add", "origin", "git@gitlab.example.com:group/sub/webapp.git")
    git(repo, "config", "user.name", "Ada Lovelace")
    sha = git(repo, "rev-parse", "HEAD").strip()
    p = sources.predefined(repo, builds_dir="/builds")
    v = p.variables
    assert v["CI_COMMIT_SHA"] == sha and v["CI_COMMIT_SHORT_SHA"] == sha[:8]
    assert (v["CI_COMMIT_BRANCH"], v["CI_COMMIT_REF_NAME"], v["CI_COMMIT_REF_SLUG"]) == (
        "main", "main", "main")
    assert v["CI_DEFAULT_BRANCH"] == "main" and v["CI_COMMIT_REF_PROTECTED"] == "true"
    assert v["CI_COMMIT_MESSAGE"] == "Add the pipeline\n\nWith a body line."
    assert v["CI_COMMIT_TITLE"] == "Add the pipeline"
    assert v["CI_COMMIT_DESCRIPTION"] == "With a body line."
    assert v["CI_COMMIT_AUTHOR"] == "Ada Lovelace <ada@example.com>"
    assert v["CI_COMMIT_TIMESTAMP"] == "2024-05-01T12:00:00+02:00"
    assert (v["CI_PROJECT_PATH"], v["CI_PROJECT_NAMESPACE"], v["CI_PROJECT_NAME"]) == (
        "group/sub/webapp", "group/sub", "webapp")
    assert v["CI_PROJECT_ROOT_NAMESPACE"] == "group"
    assert v["CI_PROJECT_PATH_SLUG"] == "group-sub-webapp"
    assert v["CI_PROJECT_URL"] == "https://gitlab.example.com/group/sub/webapp"
    assert v["CI_SERVER_HOST"] == "gitlab.example.com"
    assert v["CI_PROJECT_DIR"] == "/builds/group/sub/webapp"
    assert v["CI_PIPELINE_SOURCE"] == "push" and v["CI"] == v["GITLAB_CI"] == "true"
    assert v["GITLAB_USER_NAME"] == "Ada Lovelace"
    assert p.notes == ()


def test_feature_branch_with_upstream_remote_and_default_branch(repo: Path) -> None:
    git(repo, "remote", "add", "fork", "https://gitlab.example.com:8443/me/webapp.git")
    git(repo, "remote", "add", "origin", "ssh://git@gitlab.example.com:2222/team/webapp")
    git(repo, "update-ref", "refs/remotes/origin/develop", "HEAD")
    git(repo, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/develop")
    git(repo, "checkout", "-q", "-b", "Feature/Login_Page")
    git(repo, "config", "branch.Feature/Login_Page.remote", "fork")
    v = sources.predefined(repo).variables
    assert v["CI_COMMIT_REF_SLUG"] == "feature-login-page"
    assert v["CI_DEFAULT_BRANCH"] == "develop" and v["CI_COMMIT_REF_PROTECTED"] == "false"
    assert v["CI_PROJECT_PATH"] == "me/webapp"  # the branch's own remote
    assert v["CI_SERVER_URL"] == "https://gitlab.example.com:8443"
    assert v["CI_SERVER_PORT"] == "8443"


def test_detached_head_at_a_tag(repo: Path) -> None:
    git(repo, "tag", "-a", "v1.2.0", "-m", "Release 1.2")
    git(repo, "checkout", "-q", "--detach", "v1.2.0")
    v = sources.predefined(repo).variables
    assert v["CI_COMMIT_TAG"] == "v1.2.0" and v["CI_COMMIT_REF_NAME"] == "v1.2.0"
    assert "CI_COMMIT_BRANCH" not in v and v["CI_COMMIT_TAG_MESSAGE"] == "Release 1.2"


def test_no_remote_is_said_not_invented(repo: Path) -> None:
    p = sources.predefined(repo)
    assert p.variables["CI_PROJECT_PATH"] == "webapp"
    assert "CI_PROJECT_NAMESPACE" not in p.variables and "CI_SERVER_URL" not in p.variables
    assert any("no GitLab remote" in n for n in p.notes)


@pytest.mark.parametrize("url, host, path", [
    ("git@gitlab.com:group/project.git", "gitlab.com", "group/project"),
    ("https://gitlab.com/group/sub/project.git", "gitlab.com", "group/sub/project"),
    ("https://user:token@gitlab.com/group/project", "gitlab.com", "group/project"),
    ("ssh://git@host.example:2222/group/project.git", "host.example", "group/project"),
    ("http://host:8080/g/p.git/", "host:8080", "g/p"),
])
def test_parse_remote(url: str, host: str, path: str) -> None:
    remote = sources.parse_remote(url)
    assert remote is not None and (remote.host, remote.path) == (host, path)


@pytest.mark.parametrize("url", ["/srv/git/project.git", "file:///srv/project", "../p",
                                 "https://host/onlyproject"])
def test_parse_remote_refuses_non_gitlab_urls(url: str) -> None:
    assert sources.parse_remote(url) is None
