"""The developer commands on real systemd, as an ordinary user going through sudo:
`nspawn-runner exec JOB` (a .gitlab-ci.yml job through config, prepare, run and cleanup) and
`nspawn-runner shell IMAGE -- CMD` (a command in a build image as that user)."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IMAGE, ROOTS, settled_leftovers, sh

ROOT = Path(ROOTS["overlay"][0])
SRC = Path(__file__).resolve().parents[2]
EXAMPLE = SRC / "examples" / "project"
USER = "nrdev"
HOME = Path("/home") / USER
SETTINGS = Path("/etc/nspawn-runner/config.toml")
EXE = str(Path(shutil.which("nspawn-runner") or "nspawn-runner").resolve())
SUDOERS = Path("/etc/sudoers.d")


@pytest.fixture(scope="module")
def dev() -> Iterator[str]:
    """An ordinary user, allowed `exec` by a rule of the test and `shell` by the shipped
    example file (installed with this host's path of nspawn-runner)."""
    sh("groupadd", "-f", "builders")
    sh("groupadd", "-f", "developers")
    sh("useradd", "--create-home", "--shell", "/bin/bash", "--groups", "builders,developers",
       USER, check=False)
    example = (SRC / "examples" / "sudoers.d" / "nspawn-runner").read_text()
    (SUDOERS / "nspawn-runner").write_text(example.replace("/usr/local/bin/nspawn-runner", EXE))
    (SUDOERS / "nrdev-exec").write_text(f"{USER} ALL=(root) NOPASSWD: {EXE} exec *\n")
    for f in ("nspawn-runner", "nrdev-exec"):
        (SUDOERS / f).chmod(0o440)
    for f in ("nspawn-runner", "nrdev-exec"):
        check = subprocess.run(["visudo", "-c", "-f", str(SUDOERS / f)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    yield USER
    for f in ("nspawn-runner", "nrdev-exec"):
        (SUDOERS / f).unlink(missing_ok=True)
    sh("userdel", "--remove", USER, check=False)


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    yield
    for root in (ROOT, Path(ROOTS["btrfs"][0])):
        left = settled_leftovers(root)
        assert not left, f"left behind: {left}"
        shells = root / "local" / "shells"
        assert not shells.exists() or not list(shells.iterdir())


def as_dev(*args: str, cwd: Path, stdin: str | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", USER, "--", "sudo", "-n", EXE, *args], cwd=cwd,
                          input=stdin, capture_output=True, text=True, timeout=timeout,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["runuser", "-u", USER, "--", "git", "-C", str(repo),
                           "-c", "user.name=Dev", "-c", "user.email=dev@example.com", *args],
                          check=True, capture_output=True, text=True).stdout


def checkout(name: str, source: Path | None = None, files: dict[str, str] | None = None
             ) -> Path:
    """A git checkout owned by the user: a copy of `source`, or `files`, committed."""
    repo = HOME / name
    shutil.rmtree(repo, ignore_errors=True)
    if source is not None:
        shutil.copytree(source, repo)
    else:
        repo.mkdir()
    for rel, text in (files or {}).items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    sh("chown", "-R", f"{USER}:{USER}", str(repo))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"{name}: first commit")
    return repo


def forget(project: str) -> None:
    """Caches and stored artifacts of earlier runs of `project` (they outlive runs: that is
    what they are for)."""
    for root in (Path(r) for r, _ in ROOTS.values()):
        shutil.rmtree(root / "cache" / "local" / project, ignore_errors=True)
        shutil.rmtree(root / "local" / "artifacts" / "local" / project, ignore_errors=True)


@pytest.fixture
def wordcount(dev: str) -> Iterator[Path]:
    forget("wordcount")
    repo = checkout("wordcount", EXAMPLE)
    yield repo
    shutil.rmtree(repo, ignore_errors=True)
    forget("wordcount")


@pytest.fixture(params=["overlay", "btrfs"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """exec reads the default settings file (sudo drops NSPAWN_RUNNER_CONFIG): point it at
    the state root of the backend under test."""
    SETTINGS.parent.mkdir(parents=True, exist_ok=True)
    SETTINGS.write_text(f'root = "{ROOTS[request.param][0]}"\n')
    yield str(request.param)
    SETTINGS.unlink()


def plain(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


# ---- exec -------------------------------------------------------------------------------------

def test_exec_example_build_twice_then_deploy(wordcount: Path, backend: str) -> None:
    sha = git(wordcount, "rev-parse", "--short", "HEAD").strip()
    first = as_dev("exec", "build", cwd=wordcount)
    out = plain(first)
    assert first.returncode == 0, out
    # the stages, as gitlab-runner names them
    for header in ("Preparing environment", "Getting source from Git repository",
                   "Restoring cache", 'Executing "step_script" stage of the job script',
                   "Running after_script", "Saving cache for successful job",
                   "Uploading artifacts for successful job"):
        assert header in out
    # !reference (.show-env), top-level variables, $$, the checkout's git history at HEAD
    assert "GREETING=hello from the top level PRICE=costs $5" in out
    assert f"job build (build) at {sha}" in out
    assert "build number 1 of this cache" in out
    assert "after_script sees CI_JOB_STATUS=success" in out
    assert re.search(r"^Job build passed in [0-9.]+ s$", first.stdout, re.M), out
    report = wordcount / "dist" / "report.txt"
    assert report.read_text().startswith("job 3\n")
    assert report.stat().st_uid == int(sh("id", "-u", USER))  # the caller's, not root's
    assert not (wordcount / "dist" / "scratch.tmp").exists()  # artifacts:exclude
    second = as_dev("exec", "build", cwd=wordcount)
    assert second.returncode == 0 and "build number 2 of this cache" in second.stdout
    # deploy needs the artifacts of the build stage: those of the last local run
    deploy = as_dev("exec", "deploy", cwd=wordcount)
    assert deploy.returncode == 0, plain(deploy)
    assert "would deploy job 3 to staging/main" in deploy.stdout


def test_exec_failing_job_reports_its_own_code(wordcount: Path) -> None:
    (wordcount / "fail.yml").write_text(
        "fail:\n  image: bookworm\n  script: [echo before, exit 42, echo never]\n"
        "  after_script: ['echo after sees $CI_JOB_STATUS']\n")
    result = as_dev("exec", "--file", "fail.yml", "fail", cwd=wordcount)
    out = plain(result)
    assert result.returncode == 42, out
    assert "before" in out and "\nnever\n" not in out
    assert "after sees failed" in out
    assert re.search(r"^Job fail failed with exit code 42 in [0-9.]+ s$", result.stdout, re.M)


def test_exec_allow_failure_exit_codes(wordcount: Path) -> None:
    # An uncommitted change, seen by the job: the working tree, not the last commit.
    script = wordcount / "src" / "wordcount.sh"
    script.write_text(script.read_text() + "# TODO: handle empty files\n")
    result = as_dev("exec", "lint", cwd=wordcount)
    assert result.returncode == 0, plain(result)
    assert "failed with exit code 3 (allowed to fail)" in result.stdout
    committed = as_dev("exec", "--tracked-only", "lint", cwd=wordcount)
    assert committed.returncode == 0 and "passed" in committed.stdout, plain(committed)


def test_exec_timeout_goes_through_sigterm(wordcount: Path) -> None:
    start = time.monotonic()
    result = as_dev("exec", "slow", cwd=wordcount)
    took = time.monotonic() - start
    assert result.returncode == 124, plain(result)
    assert "timed out after its 15 s timeout" in result.stdout
    assert "execution took longer than 15s" in result.stdout
    assert took < 60


def test_exec_variables_rules_and_services(wordcount: Path) -> None:
    greet = as_dev("exec", "greet", "--var", "GREETING=hi", cwd=wordcount)
    assert greet.returncode == 0 and "hi, greet on main; costs $5" in greet.stdout
    service = as_dev("exec", "service", cwd=wordcount)
    assert service.returncode == 0, plain(service)  # a unit started, then used
    git(wordcount, "checkout", "-q", "-b", "feature")
    excluded = as_dev("exec", "deploy", cwd=wordcount)
    assert excluded.returncode == 125 and "--force" in excluded.stderr


def test_exec_unsupported_keyword_is_125_and_boots_nothing(wordcount: Path) -> None:
    ci = wordcount / ".gitlab-ci.yml"
    ci.write_text(ci.read_text() + "\ndb-test:\n  script: [psql -c 'select 1']\n"
                  "  services: [postgres:16]\n")
    result = as_dev("exec", "db-test", cwd=wordcount)
    assert result.returncode == 125
    assert "jobs:db-test:services" in result.stderr and "booting" not in plain(result)
    missing = as_dev("exec", "build", "--image", "no-such-image", cwd=wordcount)
    assert missing.returncode == 125 and "available: " in missing.stderr


def test_exec_working_tree_as_git_sees_it(dev: str) -> None:
    repo = checkout("sources", files={
        ".gitignore": "*.log\nbuild/\n",
        "tracked.txt": "committed\n",
        "deleted.txt": "committed, then deleted\n",
        ".gitlab-ci.yml": (
            "look:\n  image: bookworm\n  script:\n"
            "    - cat tracked.txt\n"
            "    - test -e untracked.txt && echo untracked-present\n"
            "    - test -e debug.log || echo ignored-absent\n"
            "    - test -e build || echo ignored-dir-absent\n"
            "    - test -e deleted.txt || echo deleted-absent\n"
            "    - git log --format=%s\n"),
    })
    (repo / "tracked.txt").write_text("changed in the working tree\n")
    (repo / "untracked.txt").write_text("new\n")
    (repo / "debug.log").write_text("ignored\n")
    (repo / "build").mkdir()
    (repo / "deleted.txt").unlink()
    result = as_dev("exec", "look", cwd=repo)
    out = plain(result)
    assert result.returncode == 0, out
    for line in ("changed in the working tree", "untracked-present", "ignored-absent",
                 "ignored-dir-absent", "deleted-absent", "sources: first commit"):
        assert f"\n{line}\n" in out, line  # the output line, not the echoed command
    committed = as_dev("exec", "--tracked-only", "look", cwd=repo)
    assert committed.returncode == 0, plain(committed)
    assert "\ncommitted\n" in committed.stdout
    assert "\nuntracked-present\n" not in committed.stdout
    shutil.rmtree(repo)


def run_in_pty(argv: list[str], cwd: Path, replies: list[tuple[str, str]],
               timeout: float = 300) -> tuple[int, str]:
    """Run argv on a terminal; when the output since the last reply shows a prompt, type the
    next reply."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.execvp(argv[0], argv)
    output, mark, end = b"", 0, time.monotonic() + timeout
    pending = list(replies)
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            output += data
        if pending and pending[0][0].encode() in output[mark:]:
            time.sleep(0.3)
            os.write(fd, pending.pop(0)[1].encode())
            mark = len(output)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode("utf-8", "replace")


def test_exec_shell_on_failure_and_keep(wordcount: Path) -> None:
    (wordcount / "fail.yml").write_text(
        "fail:\n  image: bookworm\n  variables: {MINE: from-the-job}\n"
        "  script: [echo made > left-by-the-step, exit 5]\n")
    code, out = run_in_pty(
        ["runuser", "-u", USER, "--", "sudo", "-n", EXE, "exec", "--file", "fail.yml", "fail",
         "--shell-on-failure", "--keep"], wordcount,
        [("/builds/wordcount#", "echo INSIDE $MINE $(cat left-by-the-step) $PWD\r"),
         ("INSIDE from-the-job made /builds/wordcount", "exit\r")])
    assert code == 5, out
    assert "--- shell ended; the job goes on ---" in out
    machine = re.search(r"Machine (nr-[0-9]+-[0-9a-f]{8}) is still running", out)
    assert machine, out
    name = machine.group(1)
    try:
        inside = sh("systemd-run", "--quiet", "--pipe", "--wait", f"--machine={name}",
                    "/bin/cat", "/builds/wordcount/left-by-the-step")
        assert inside == "made\n"
    finally:
        sh(EXE, "gc", "--grace", "0")
    assert name not in sh("machinectl", "list", "--no-legend")


# ---- shell ------------------------------------------------------------------------------------

def shell(*args: str, cwd: Path = HOME, stdin: str | None = None
          ) -> subprocess.CompletedProcess[str]:
    return as_dev("shell", *args, cwd=cwd, stdin=stdin, timeout=120)


def test_shell_is_the_user_with_home_and_status(dev: str) -> None:
    project = HOME / "project"
    project.mkdir(exist_ok=True)
    shutil.chown(project, USER, USER)
    ids = shell(IMAGE, "--", "sh", "-c", "id -un; id -u; id -g; id -Gn; pwd", cwd=project)
    assert ids.returncode == 0, plain(ids)
    name, uid, gid, groups, cwd = ids.stdout.split("\n")[:5]
    assert (name, uid, gid) == (USER, sh("id", "-u", USER).strip(), sh("id", "-g", USER).strip())
    assert {"builders", "developers"} <= set(groups.split())
    assert cwd == str(project)
    made = shell(IMAGE, "--", "sh", "-c",
                 "echo hi > ~/made-inside && echo x > /tmp/not-kept && touch /etc/x; exit 7")
    assert made.returncode == 7  # touch /etc/x failed, but the status is the command's
    assert "Permission denied" in made.stderr
    assert (HOME / "made-inside").stat().st_uid == int(uid)
    assert not Path("/tmp/not-kept").exists()
    again = shell(IMAGE, "--", "cat", "/tmp/not-kept")
    assert again.returncode == 1  # nothing outside the home survives a run
    piped = shell(IMAGE, "--", "tr", "a-z", "A-Z", stdin="through a pipe\n")
    assert piped.returncode == 0 and piped.stdout == "THROUGH A PIPE\n"
    journal = sh("journalctl", "--no-pager", "-o", "cat", "-t", "nspawn-runner-shell")
    assert f"user={USER} uid={uid}" in journal and "-- tr a-z A-Z" in journal


def test_shell_refuses_what_would_give_root(dev: str) -> None:
    secret = Path("/srv/nspawn-runner-secret")
    secret.mkdir(mode=0o700, exist_ok=True)
    try:
        unreadable = shell("--bind-ro", f"{secret}:/srv/s", IMAGE, "--", "true")
        assert unreadable.returncode == 125 and "may not read" in unreadable.stderr
        over_etc = shell("--bind-ro", f"{HOME}:/etc/passwd", IMAGE, "--", "true")
        assert over_etc.returncode == 125 and "system directory" in over_etc.stderr
        not_writable = shell("--bind", "/usr/share/doc:/srv/doc", IMAGE, "--", "true")
        assert not_writable.returncode == 125 and "may not write" in not_writable.stderr
        # setuid programs of the image do not make the user root (no_new_privs)
        su = shell(IMAGE, "--", "sh", "-c", "su -c id root </dev/null; mount -t tmpfs t /mnt")
        assert su.returncode != 0 and "uid=0" not in su.stdout
        # the sudoers example allows `shell` and nothing else
        other = subprocess.run(["runuser", "-u", USER, "--", "sudo", "-n", EXE, "gc"],
                               capture_output=True, text=True)
        assert other.returncode == 1 and "password is required" in other.stderr
    finally:
        secret.rmdir()


def test_shell_binds_and_keep(dev: str) -> None:
    data = HOME / "data"
    data.mkdir(exist_ok=True)
    shutil.chown(data, USER, USER)
    result = shell("--bind", f"{data}:/srv/data", "--keep", IMAGE, "--", "sh", "-c",
                   "echo bound > /srv/data/file && echo kept > /var/tmp/layer-file")
    assert result.returncode == 0, plain(result)
    assert (data / "file").read_text() == "bound\n"
    kept = re.search(r"writable layer is kept in (\S+)", result.stderr)
    assert kept, result.stderr
    upper = Path(kept.group(1))
    assert (upper / "var" / "tmp" / "layer-file").read_text() == "kept\n"
    shutil.rmtree(upper.parent)
