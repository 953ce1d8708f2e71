"""exec's parts that need no systemd: the runner's local modes (sources, artifacts,
dependencies, the failure hook, --keep) against the emulator's fake driver, the transfer of
files in and out, exit codes, --list and --preview through the CLI."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nspawn_runner import cli
from nspawn_runner.local import exec as local_exec
from nspawn_runner.local import runner as rn
from nspawn_runner.local import sources, transfer
from nspawn_runner.local.ci_model import AllowFailure, ResolvedJob

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FAKE_DRIVER = str(FIXTURES / "fake_driver.sh")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "project"
GIT_ENV = {"GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.com",
           "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.com",
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def config(root: Path, **changes: object) -> rn.RunnerConfig:
    bindir = root / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "gitlab-runner").symlink_to(local_exec.HELPER)
    out = rn.RunnerConfig(
        run_exec=[FAKE_DRIVER, "run"], config_exec=[FAKE_DRIVER, "config"],
        prepare_exec=[FAKE_DRIVER, "prepare"], cleanup_exec=[FAKE_DRIVER, "cleanup"],
        retry_delay=0.05, graceful_kill_timeout=5, force_kill_timeout=5,
        extra_process_env={"FAKE_DRIVER_ROOT": str(root),
                           "PATH": f"{bindir}:{os.environ['PATH']}"})
    for key, value in changes.items():
        setattr(out, key, value)
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def archive_of(files: dict[str, str], path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_local_sources_artifacts_and_dependencies(root: Path, tmp_path: Path) -> None:
    archive_of({"./README": "from the working tree\n"}, tmp_path / "source.tar")
    archive_of({"dist/app.bin": "built earlier\n"}, tmp_path / "dep.tar")
    failures: list[tuple[str, str]] = []
    job = rn.Job(
        script=["cat README dist/app.bin", "mkdir -p out/sub", "echo result > out/r.txt",
                "echo tmp > out/sub/x.tmp", "echo $ARTIFACT_DIR"],
        server_variables=[rn.JobVariable("CI_PROJECT_PATH", "group/project"),
                          rn.JobVariable("ARTIFACT_DIR", "out")],
        git_strategy=None, local_sources=str(tmp_path / "source.tar"),
        dependency_archives=[("build", str(tmp_path / "dep.tar"))],
        artifacts=[rn.ArtifactSpec(paths=["$ARTIFACT_DIR/"], exclude=["out/**/*.tmp"])],
        local_artifacts=str(tmp_path / "artifacts"))
    run = rn.JobRun(config(root), job, on_script_failure=lambda d, v: failures.append((d, "")))
    result = run.run()
    assert result.status == "success", result.plain_log
    assert "from the working tree" in result.plain_log and "built earlier" in result.plain_log
    assert "Downloading artifacts for build (from its last local run)" in result.plain_log
    # the made-up predefined variables of the tests' jobs are gone
    assert "CI_SERVER_VERSION" not in result.calls[0].argv and "CI_SERVER_VERSION=" not in \
        "".join(c.script or "" for c in result.calls)
    _data, kept = transfer.filter_artifacts(tmp_path / "artifacts", ["out/**/*.tmp"])
    assert kept == ["out/r.txt"] and failures == []


def test_failure_hook_runs_before_after_script_and_keep_skips_cleanup(root: Path) -> None:
    seen: list[tuple[str, str | None]] = []
    job = rn.Job(script=["echo step", "exit 7"], after_script=["echo after $CI_JOB_STATUS"],
                 server_variables=[rn.JobVariable("MINE", "x")])
    run = rn.JobRun(config(root, skip_cleanup=True), job,
                    on_script_failure=lambda d, v: seen.append((d, v.get("MINE"))))
    result = run.run()
    assert result.status == "failed" and result.exit_code == 7
    assert seen == [(f"{root}/builds/group/project", "x")]
    assert "after failed" in result.plain_log
    assert "cleanup" not in [c.kind for c in result.calls]


def test_exit_codes() -> None:
    def job(**allow: object) -> ResolvedJob:
        return ResolvedJob("j", "test", None, (), ("x",), (), (), AllowFailure(**allow),  # type: ignore[arg-type]
                           None, None, (), None, "on_success", True, "", None, (), ())

    def result(status: str, code: int | None = None) -> rn.JobResult:
        return rn.JobResult(status, None, code, None, "", "", "", [], [], 1.0)  # type: ignore[arg-type]

    assert local_exec.exit_code(job(), result("success")) == 0
    assert local_exec.exit_code(job(), result("failed", 42)) == 42
    assert local_exec.exit_code(job(exit_codes=(42,)), result("failed", 42)) == 0
    assert local_exec.exit_code(job(exit_codes=(42,)), result("failed", 1)) == 1
    assert local_exec.exit_code(job(allowed=True), result("failed", 3)) == 0
    assert local_exec.exit_code(job(), result("timedout")) == 124
    assert local_exec.exit_code(job(allowed=True), result("timedout")) == 0
    assert local_exec.exit_code(job(), result("system_failure")) == 125
    assert local_exec.exit_code(job(), result("canceled")) == 130


# ---- transfer --------------------------------------------------------------------------------

def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={**os.environ, **GIT_ENV})


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    repo = tmp_path / "wordcount"
    shutil.copytree(EXAMPLE, repo)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "Word count")
    for n in range(3):
        (repo / f"history{n}.txt").write_text(str(n))
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"more {n}")
    return repo


def test_source_archive_is_a_shallow_clone_with_the_working_tree(project: Path,
                                                                 tmp_path: Path) -> None:
    (project / "src/words.txt").write_text("changed, not committed\n")
    (project / "untracked.txt").write_text("new\n")
    (project / "dist").mkdir()
    (project / "dist/ignored.txt").write_text("ignored\n")
    (project / "history0.txt").unlink()
    tree = sources.tree(project)
    pre = sources.predefined(project).variables
    work = tmp_path / "work"
    transfer.source_archive(tree, pre, 2, work, tmp_path / "s.tar", "https://h/g/p.git")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-x", "-f", str(tmp_path / "s.tar"), "-C", str(out)], check=True)
    assert (out / "src/words.txt").read_text() == "changed, not committed\n"
    assert (out / "untracked.txt").exists() and not (out / "dist").exists()
    assert not (out / "history0.txt").exists()
    log = subprocess.run(["git", "-C", str(out), "log", "--format=%s"], capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert [line for line in log if line] == ["more 2", "more 1"]  # GIT_DEPTH 2
    head = subprocess.run(["git", "-C", str(out), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert head == pre["CI_COMMIT_SHA"]
    status = subprocess.run(["git", "-C", str(out), "status", "--porcelain"],
                            capture_output=True, text=True, check=True).stdout
    assert " M src/words.txt" in status and "?? untracked.txt" in status
    remote = subprocess.run(["git", "-C", str(out), "remote", "get-url", "origin"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert remote == "https://h/g/p.git" and not work.joinpath("src").exists()


def test_source_archive_tracked_only(project: Path, tmp_path: Path) -> None:
    (project / "src/words.txt").write_text("changed\n")
    (project / "untracked.txt").write_text("new\n")
    tree = sources.tree(project, tracked_only=True)
    transfer.source_archive(tree, sources.predefined(project).variables, 20, tmp_path / "w",
                            tmp_path / "s.tar", None)
    names = tarfile.open(tmp_path / "s.tar").getnames()
    assert "./untracked.txt" not in names and "./src/words.txt" in names
    data = tarfile.open(tmp_path / "s.tar").extractfile("./src/words.txt")
    assert data is not None and data.read() != b"changed\n"


def test_filter_artifacts_drops_excluded_unsafe_and_special(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        for name, kind in [("./dist/app", tarfile.REGTYPE), ("dist/x.tmp", tarfile.REGTYPE),
                           ("dist/sub/y.tmp", tarfile.REGTYPE), ("../escape", tarfile.REGTYPE),
                           ("/abs", tarfile.REGTYPE), ("dev", tarfile.CHRTYPE),
                           ("suid", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)]:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o4755 if name == "suid" else 0o644
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    data, kept = transfer.filter_artifacts(path, ["dist/*.tmp"])
    assert kept == ["dist/app", "dist/sub/y.tmp", "suid", "link"]
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(data))}
    assert members["suid"].mode == 0o755 and members["link"].linkname == "/etc/passwd"


def test_filter_artifacts_reads_the_real_helpers_zip(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("dist/", b"")
        z.writestr("dist/app", b"binary")
    data, kept = transfer.filter_artifacts(path, [])
    assert kept == ["dist/app"]
    again = transfer.as_format_of(path, data)
    assert zipfile.ZipFile(io.BytesIO(again)).read("dist/app") == b"binary"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_artifacts_are_extracted_with_the_callers_rights() -> None:
    nobody = transfer.Caller(65534, 65534, "nobody", "/nonexistent")
    top = Path(tempfile.mkdtemp(prefix="nspawn-runner-test-"))  # pytest's is root's only
    top.chmod(0o755)
    try:
        extract_into(nobody, top)
    finally:
        shutil.rmtree(top)


def extract_into(nobody: transfer.Caller, top: Path) -> None:
    dest = top / "tree"
    dest.mkdir()
    os.chown(dest, 65534, 65534)
    (dest / "escape").symlink_to("/etc")  # a symlink in the checkout, pointing out of it
    os.lchown(dest / "escape", 65534, 65534)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name in ("dist/app", "escape/nspawn-runner-test"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(Exception, match="tar"):
        transfer.extract_as(nobody, data.getvalue(), dest)
    assert (dest / "dist/app").stat().st_uid == 65534
    assert not Path("/etc/nspawn-runner-test").exists()


def test_next_job_id_counts(tmp_path: Path) -> None:
    assert [transfer.next_job_id(tmp_path) for _ in range(3)] == [1, 2, 3]


def test_strip_credentials() -> None:
    assert transfer.strip_credentials("https://u:tok@host/g/p.git") == "https://host/g/p.git"
    assert transfer.strip_credentials("git@host:g/p.git") == "git@host:g/p.git"


# ---- the command line ------------------------------------------------------------------------

def test_list_and_preview_through_the_cli(project: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(cli.app, ["exec", "--list", "-C", str(project)])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split() == ["JOB", "STAGE", "WHEN", "IN", "THIS", "PIPELINE"]
    assert any(line.split()[:3] == ["slow", "test", "manual"] for line in lines)
    shown = runner.invoke(cli.app, ["exec", "--preview", "greet", "-C", str(project),
                                    "--var", "GREETING=hi"])
    assert shown.exit_code == 0, shown.output
    assert "GREETING: hi" in shown.output and "SEEN_BY_RULES: 'yes'" in shown.output


def test_exec_refusals_are_125_with_the_reason(project: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli.app, ["exec", "nope", "-C", str(project)])
    assert missing.exit_code == 125 and "no job 'nope'" in missing.output
    ci = project / ".gitlab-ci.yml"
    ci.write_text(ci.read_text() + "\ndb-test:\n  script: [x]\n  services: [postgres]\n")
    unsupported = runner.invoke(cli.app, ["exec", "db-test", "-C", str(project)])
    assert unsupported.exit_code == 125 and "jobs:db-test:services" in unsupported.output
    plain = tmp_path / "plain"
    plain.mkdir()
    outside = runner.invoke(cli.app, ["exec", "--list", "-C", str(plain)])
    assert outside.exit_code == 125 and "not in a git repository" in outside.output
    (project / ".gitlab-ci.yml").write_text("job: [unclosed\n")
    broken = runner.invoke(cli.app, ["exec", "--list", "-C", str(project)])
    assert broken.exit_code == 125 and "invalid YAML" in broken.output


def test_excluded_job_needs_force(project: Path) -> None:
    git(project, "checkout", "-q", "-b", "feature")
    result = CliRunner().invoke(cli.app, ["exec", "deploy", "-C", str(project)])
    assert result.exit_code == 125 and "--force" in result.output
