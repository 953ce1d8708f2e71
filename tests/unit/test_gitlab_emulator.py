"""The gitlab-runner emulator (tests/gitlab_emulator.py) against a tiny local driver.

No root, no systemd: tests/fixtures/fake_driver.sh runs the job scripts with bash right here,
under a temp root, and tests/fixtures/fake-gitlab-runner stands in for the helper binary.
"""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import gitlab_emulator as ge
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FAKE_DRIVER = str(FIXTURES / "fake_driver.sh")
FAKE_RUNNER = FIXTURES / "fake-gitlab-runner"

SCRIPT_HEADER = (
    "#!/usr/bin/env bash\n"
    "\n"
    "trap 'exit 1' TERM\n"
    "\n"
    'case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit\n'
    "set +o noclobber\n"
)


def make_config(root: Path, *, helper: bool = False, **changes: object) -> ge.RunnerConfig:
    """The fake driver for all four calls; run gets an extra run_arg before its own two."""
    env = {"FAKE_DRIVER_ROOT": str(root)}
    if helper:
        bindir = root / "bin"
        bindir.mkdir(exist_ok=True)
        link = bindir / "gitlab-runner"
        if not link.exists():
            link.symlink_to(FAKE_RUNNER)
        env["PATH"] = f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    config = ge.RunnerConfig(
        run_exec=[FAKE_DRIVER, "--run-arg", "run"],
        config_exec=[FAKE_DRIVER, "config"],
        prepare_exec=[FAKE_DRIVER, "prepare"],
        cleanup_exec=[FAKE_DRIVER, "cleanup"],
        retry_delay=0.05,
        stage_retry_delay=0.05,
        graceful_kill_timeout=5.0,
        force_kill_timeout=5.0,
        extra_process_env=env,
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def run(root: Path, job: ge.Job, **kwargs: object) -> ge.JobResult:
    helper = bool(kwargs.pop("helper", False))
    cancel_at = kwargs.pop("cancel_at", None)
    abort_at = kwargs.pop("abort_at", None)
    config = make_config(root, helper=helper, **kwargs)
    assert cancel_at is None or isinstance(cancel_at, tuple)
    assert abort_at is None or isinstance(abort_at, tuple)
    return ge.run_job(config, job, cancel_at=cancel_at, abort_at=abort_at, timeout=60)


def calls_log(root: Path) -> list[str]:
    return (root / "calls.log").read_text().splitlines()


def decode_body(script: str) -> str:
    """The eval'd body of a generated script, decoded by bash itself."""
    start = script.index("(trap 'exit 1' TERM; eval ") + len("(trap 'exit 1' TERM; eval ")
    end = script.rindex(") < /dev/null\n")
    out = subprocess.run(["bash", "-c", "printf '%s' " + script[start:end]],
                         capture_output=True, check=True)
    return out.stdout.decode()


# --- success, layout, order -------------------------------------------------------------------


def test_success_runs_every_stage_in_order(root: Path) -> None:
    job = ge.Job(script=["echo hello from the job", "pwd"],
                 extra_steps={"release": ["echo releasing"]},
                 after_script=["echo after status=$CI_JOB_STATUS"], image="debian:bookworm")
    result = run(root, job)
    log = result.plain_log

    assert result.status == "success", log
    assert result.exit_code is None and result.failure_reason is None
    assert result.stages == ["config", "prepare", "prepare_script", "get_sources",
                             "build_script", "step_release", "after_script",
                             "cleanup_file_variables", "cleanup"]
    assert "Using Custom executor with driver fake driver v0.0.1..." in log
    assert "Running on " in log and " via fake-driver-host..." in log
    assert "hello from the job\n" in log
    assert "releasing\n" in log
    assert "after status=success\n" in log
    assert "Job succeeded" in log
    # job_env reaches the driver (prepare prints it) but the runner never puts it in a script.
    assert "job_env          => from-config" in log
    for call in result.calls:
        assert call.script is None or "FAKE_DRIVER_JOB_ENV" not in decode_body(call.script)
    # Layout: builds_dir/<group/project>.
    assert f"{root}/builds/group/project\n" in log
    assert "job image        => debian:bookworm" in log
    # Config runs before StartBuild: the directories are empty there.
    assert "config builds_dir=[] project_dir=[] concurrent_id=[0]" in log
    # Cleanup's output goes to the runner log only.
    assert "fake driver: cleanup" not in result.raw_log
    assert 'msg="fake driver: cleanup" cleanup_std=out' in result.runner_log
    assert 'level=warning msg="fake driver: cleanup (stderr)"' in result.runner_log
    # Every call: exit 0, a duration; the temp dir is gone afterwards.
    assert all(code == 0 for _, code, _ in result.call_summary())
    assert result.tempdir is not None and not os.path.exists(result.tempdir)
    assert os.path.basename(result.tempdir).startswith("custom-executor")


def test_run_calls_get_a_fresh_script_each_and_the_stage_last(root: Path) -> None:
    result = run(root, ge.Job(script=["true"], after_script=["true"]))
    assert result.status == "success", result.plain_log
    runs = [c for c in result.calls if c.kind == "run"]
    paths = [c.script_path for c in runs]
    assert len(set(paths)) == len(paths)
    for call in runs:
        assert call.argv[:3] == [FAKE_DRIVER, "--run-arg", "run"]
        assert call.argv[3:] == [call.script_path, call.stage]
        assert call.script_path is not None and result.tempdir is not None
        assert re.fullmatch(re.escape(result.tempdir) + r"/script[^/]+/script", call.script_path)
    for line in calls_log(root):
        if line.startswith("run "):
            assert " mode=700 " in line
    # Every call ran in the same temp dir (TMPDIR) for this one attempt.
    tmpdirs = {line.split("tmpdir=")[1].split()[0] for line in calls_log(root)
               if "tmpdir=" in line}
    assert tmpdirs == {result.tempdir}


def test_script_format_and_body(root: Path) -> None:
    job = ge.Job(script=["echo Hello World", "", "echo a\necho b"])
    result = run(root, job)
    assert result.status == "success", result.plain_log
    build = result.calls_of("build_script")[0]
    assert build.script is not None
    assert build.script.startswith(SCRIPT_HEADER + "(trap 'exit 1' TERM; eval $'")
    assert build.script.endswith("') < /dev/null\nexit 0\n")
    body = decode_body(build.script)
    project = f"{root}/builds/group/project"
    assert f"export CI_PROJECT_DIR={project}\n" in body
    assert "export CI_JOB_TOKEN=" in body
    assert (f"export GITLAB_ENV={project}.tmp/gitlab_runner_env\n"
            f'mkdir -p "{project}.tmp"\n'
            f'touch "{project}.tmp/gitlab_runner_env"\n'
            f'while read -r line; do export "$line"; done < "{project}.tmp/gitlab_runner_env"\n'
            f"cd {project}\n"
            "echo $'\\x1b[32;1m$ echo Hello World\\x1b[0;m'\n"
            "echo Hello World\n"
            "echo\n"
            "\n"
            "echo $'\\x1b[32;1m$ echo a # collapsed multi-line command\\x1b[0;m'\n"
            "echo a\necho b\n") in body
    prepare = decode_body(result.calls_of("prepare_script")[0].script or "")
    assert prepare.startswith('echo "Running on $(hostname) via fake-driver-host..."\n')
    assert "cd " not in prepare and "export " not in prepare
    cleanup_vars = decode_body(result.calls_of("cleanup_file_variables")[0].script or "")
    assert f"rm -f {project}.tmp/gitlab_runner_env\n" in cleanup_vars


# --- exit codes ------------------------------------------------------------------------------


def test_script_failure_reports_the_scripts_exit_code(root: Path) -> None:
    result = run(root, ge.Job(script=["echo before", "exit 42", "echo never"]))
    assert result.status == "failed", result.plain_log
    assert result.failure_reason == "script_failure"
    assert result.exit_code == 42
    assert "before\n" in result.plain_log and "never\n" not in result.plain_log
    assert "ERROR: Job failed: exit status 1" in result.plain_log
    assert result.calls_of("build_script")[0].exit_code == 1


@pytest.mark.parametrize(
    ("content", "status", "exit_code"),
    [("42\\n\\nTesting", "failed", 42), ("42", "failed", 42), ("-3\\n", "failed", -3),
     (" 42", "system_failure", None), ("42 ", "system_failure", None),
     ("invalid", "system_failure", None), ("", "system_failure", None)],
)
def test_build_exit_code_file(root: Path, content: str, status: str,
                              exit_code: int | None) -> None:
    job = ge.Job(script=["exit 3"], variables={"FAKE_EXIT_CODE_CONTENT": content})
    result = run(root, job)
    assert result.status == status, result.plain_log
    assert result.exit_code == exit_code


def test_system_failure_in_prepare_is_retried_with_cleanup_each_time(root: Path) -> None:
    job = ge.Job(script=["echo never"], variables={"IS_SYSTEM_ERROR": "prepare"})
    started = time.monotonic()
    result = run(root, job)
    assert result.status == "system_failure", result.plain_log
    assert result.failure_reason == "runner_system_failure"
    assert result.stages == ["config", "prepare", "cleanup"] * 3
    assert [c.attempt for c in result.calls] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(set(result.tempdirs)) == 3
    assert not any(os.path.exists(t) for t in result.tempdirs)
    # The driver saw a new TMPDIR each attempt, and cleanup got the attempt's own.
    seen = [line.split("tmpdir=")[1].split()[0] for line in calls_log(root)]
    assert seen == [t for t in result.tempdirs for _ in range(3)]
    assert result.plain_log.count("ERROR: Preparation failed: exit status 2") == 3
    assert "Will be retried in 50ms ..." in result.plain_log
    assert "ERROR: Job failed (system failure): exit status 2" in result.plain_log
    assert time.monotonic() - started >= 3 * 0.05


def test_system_failure_in_config_is_retried(root: Path) -> None:
    result = run(root, ge.Job(script=["true"], variables={"IS_SYSTEM_ERROR": "config"}))
    assert result.status == "system_failure"
    assert result.stages == ["config", "cleanup"] * 3


def test_build_failure_in_prepare_is_not_retried(root: Path) -> None:
    result = run(root, ge.Job(script=["true"], variables={"IS_BUILD_ERROR": "1"}))
    assert result.status == "failed", result.plain_log
    assert result.stages == ["config", "prepare", "cleanup"]


def test_unknown_exit_code_is_a_system_failure(root: Path) -> None:
    result = run(root, ge.Job(script=["true"], variables={"IS_UNKNOWN_ERROR": "prepare"}))
    assert result.status == "system_failure"
    assert result.stages == ["config", "prepare", "cleanup"] * 3
    assert "unknown Custom executor executable exit code 255" in result.plain_log


def test_unknown_exit_code_in_a_step_still_runs_after_script(root: Path) -> None:
    job = ge.Job(script=["true"], after_script=["echo after status=$CI_JOB_STATUS"],
                 cache=[ge.CacheSpec(key="k", paths=["vendor"], when="always")],
                 variables={"IS_UNKNOWN_ERROR": "run:build_script"})
    result = run(root, job)
    assert result.status == "system_failure", result.plain_log
    assert result.run_stages == ["prepare_script", "get_sources", "restore_cache",
                                 "build_script", "after_script", "archive_cache_on_failure",
                                 "cleanup_file_variables"]
    assert "after status=failed\n" in result.plain_log


def test_prepare_script_failure_stops_all_run_calls(root: Path) -> None:
    job = ge.Job(script=["true"], after_script=["true"],
                 variables={"IS_BUILD_ERROR": "run:prepare_script"})
    result = run(root, job)
    assert result.status == "failed", result.plain_log
    assert result.stages == ["config", "prepare", "prepare_script", "cleanup"]
    assert ("Job failed: prepare environment: exit status 1. Check "
            "https://docs.gitlab.com/runner/shells/#shell-profile-loading") in result.plain_log


# --- stage attempts, after_script, caches ------------------------------------------------------


def test_get_sources_retry_sends_clear_worktree_first(root: Path) -> None:
    job = ge.Job(script=["echo built"], variables={"GET_SOURCES_ATTEMPTS": "2",
                                                   "FAKE_FAIL_STAGE_ONCE": "get_sources"})
    result = run(root, job)
    assert result.status == "success", result.plain_log
    assert result.run_stages == ["prepare_script", "get_sources", "clear_worktree",
                                 "get_sources", "build_script", "cleanup_file_variables"]
    assert "Deleting all tracked and untracked files due to source fetch failure" in (
        result.plain_log)


def test_get_sources_out_of_attempts_skips_steps_and_after_script(root: Path) -> None:
    job = ge.Job(script=["echo never"], after_script=["echo never either"],
                 cache=[ge.CacheSpec(key="k", paths=["x"], when="on_failure")],
                 variables={"GET_SOURCES_ATTEMPTS": "3", "IS_SYSTEM_ERROR": "run:get_sources"})
    result = run(root, job)
    assert result.status == "system_failure", result.plain_log
    assert result.run_stages == ["prepare_script", "get_sources", "clear_worktree",
                                 "get_sources", "get_sources", "archive_cache_on_failure",
                                 "cleanup_file_variables"]
    assert result.stages[-1] == "cleanup"


def test_attempts_out_of_range(root: Path) -> None:
    result = run(root, ge.Job(script=["true"], variables={"GET_SOURCES_ATTEMPTS": "11"}))
    assert result.status == "system_failure"
    assert "number of attempts out of the range [1, 10] for stage: get_sources" in (
        result.plain_log)


def test_after_script_sees_failed_and_on_failure_stages_follow(root: Path) -> None:
    job = ge.Job(script=["exit 3"], after_script=["echo after status=$CI_JOB_STATUS", "exit 9"],
                 cache=[ge.CacheSpec(key="k", paths=["x"])])  # when: on_success
    result = run(root, job)
    assert result.status == "failed" and result.exit_code == 3, result.plain_log
    assert "after status=failed\n" in result.plain_log
    assert "run after_script (CI_JOB_STATUS=failed)" in result.plain_log
    # An after_script failure is only a warning.
    assert "WARNING: after_script failed, but job will continue unaffected" in result.plain_log
    # The cache is for successful jobs only: no archive_cache_on_failure.
    assert result.run_stages == ["prepare_script", "get_sources", "restore_cache",
                                 "build_script", "after_script", "cleanup_file_variables"]
    status_lines = [line for line in calls_log(root) if line.startswith("run ")]
    assert status_lines[-1].endswith("status=failed")


def test_cache_round_trip_through_the_helper(root: Path) -> None:
    cache = [ge.CacheSpec(key="deps-$CI_COMMIT_REF_SLUG", paths=["vendor/"])]
    first = ge.Job(script=["mkdir -p vendor", "echo cached-content > vendor/data.txt"],
                   cache=cache)
    result = run(root, first, helper=True)
    assert result.status == "success", result.plain_log
    assert result.run_stages == ["prepare_script", "get_sources", "restore_cache",
                                 "build_script", "archive_cache", "cleanup_file_variables"]
    assert "Checking cache for deps-main..." in result.plain_log
    assert "Failed to extract cache" in result.plain_log  # nothing cached yet: not fatal
    assert "Created cache" in result.plain_log
    archive = root / "cache" / "group" / "project" / "deps-main" / "cache.zip"
    assert archive.is_file()
    body = decode_body(result.calls_of("archive_cache")[0].script or "")
    assert ("gitlab-runner cache-archiver --file ../../../cache/group/project/deps-main/"
            "cache.zip --timeout 10 --path vendor/") in body

    shutil.rmtree(root / "builds" / "group" / "project")
    second = ge.Job(script=["cat vendor/data.txt"], cache=cache)
    result = run(root, second, helper=True)
    assert result.status == "success", result.plain_log
    assert "Successfully extracted cache" in result.plain_log
    assert "cached-content\n" in result.plain_log


@pytest.mark.skipif(shutil.which("gitlab-runner") is not None,
                    reason="a real gitlab-runner is on PATH")
def test_cache_without_the_helper_is_only_a_warning(root: Path) -> None:
    job = ge.Job(script=["echo ok"], cache=[ge.CacheSpec(key="k", paths=["x"])])
    result = run(root, job)
    assert result.status == "success", result.plain_log
    assert "Missing gitlab-runner. Extracting cache is disabled." in result.plain_log
    assert "Missing gitlab-runner. Creating cache is disabled." in result.plain_log


def assert_valid_bash(scripts: list[str]) -> None:
    for script in scripts:
        for text in (script, decode_body(script)):
            check = subprocess.run(["bash", "-n"], input=text.encode(), capture_output=True)
            assert check.returncode == 0, check.stderr.decode() + text


def test_every_generated_script_is_valid_bash(root: Path) -> None:
    # A git strategy that needs a server: get_sources fails before running (no network used).
    fetch = ge.Job(script=["true"], git_strategy="fetch",
                   cache=[ge.CacheSpec(key="k", paths=["a b"], when="always")],
                   artifacts=[ge.ArtifactSpec(paths=["out"], when="always")],
                   file_variables={"F": "x"},
                   variables={"IS_BUILD_ERROR": "run:get_sources", "GET_SOURCES_ATTEMPTS": "2"})
    result = run(root, fetch, server_url="http://127.0.0.1:9")
    assert result.status == "failed", result.plain_log
    assert result.run_stages == ["prepare_script", "get_sources", "clear_worktree",
                                 "get_sources", "archive_cache_on_failure",
                                 "upload_artifacts_on_failure", "cleanup_file_variables"]
    body = decode_body(result.calls_of("get_sources")[0].script or "")
    assert "git init " in body and "checkout -f -q " + fetch.sha in body
    assert_valid_bash([c.script for c in result.calls if c.script])

    # Everything else; the artifacts upload fails (the stand-in has none), which is fatal.
    empty = ge.Job(script=["echo in $CI_PROJECT_DIR"], after_script=["true"],
                   git_strategy="empty", extra_steps={"Release": ["true"]},
                   cache=[ge.CacheSpec(key="main", paths=["vendor"], fallback_keys=["old"])],
                   artifacts=[ge.ArtifactSpec(paths=["out"], name="n", expire_in="1 day")],
                   services=[ge.ServiceSpec(name="postgres:16", alias="db")],
                   variables={"CACHE_FALLBACK_KEY": "fallback"})
    result = run(root, empty, helper=True, pre_build_script="echo pre",
                 post_build_script="echo post")
    assert result.status == "failed", result.plain_log
    assert "artifacts-uploader is not supported by the nspawn-runner stand-in" in result.plain_log
    assert f"in {root}/builds/group/project-empty\n" in result.plain_log
    assert "pre\n" in result.plain_log and "post\n" in result.plain_log
    assert result.run_stages == ["prepare_script", "get_sources", "restore_cache",
                                 "build_script", "step_release", "after_script",
                                 "archive_cache", "upload_artifacts_on_success",
                                 "cleanup_file_variables"]
    assert "Checking cache for old..." in result.plain_log
    assert "Checking cache for fallback..." in result.plain_log
    assert_valid_bash([c.script for c in result.calls if c.script])


# --- cancel, abort, timeouts, kill -------------------------------------------------------------


def test_ui_cancel_during_a_step_still_runs_after_script(root: Path) -> None:
    job = ge.Job(script=["echo started", "sleep 30", "echo never"],
                 after_script=["echo after status=$CI_JOB_STATUS"])
    started = time.monotonic()
    result = run(root, job, cancel_at=("build_script", 0.5))
    assert time.monotonic() - started < 10
    assert result.status == "canceled", result.plain_log
    assert "started\n" in result.plain_log and "never\n" not in result.plain_log
    assert "after status=canceled\n" in result.plain_log
    assert "script canceled externally (UI, API)" in result.plain_log
    assert result.stages[-3:] == ["after_script", "cleanup_file_variables", "cleanup"]
    build = result.calls_of("build_script")[0]
    assert build.signals_sent == ["SIGTERM"]
    assert build.duration < 5


def test_abort_runs_only_cleanup(root: Path) -> None:
    job = ge.Job(script=["sleep 30"], after_script=["echo never"])
    result = run(root, job, abort_at=("build_script", 0.5))
    assert result.status == "canceled", result.plain_log
    assert result.stages == ["config", "prepare", "prepare_script", "get_sources",
                             "build_script", "cleanup"]


def test_cancel_before_the_steps_cancels_the_whole_job(root: Path) -> None:
    job = ge.Job(script=["echo never"], after_script=["echo never"],
                 variables={"FAKE_PREPARE_SLEEP": "30"})
    result = run(root, job, cancel_at=("prepare", 0.3))
    assert result.status == "canceled", result.plain_log
    assert result.stages == ["config", "prepare", "cleanup"]  # no retry after a cancel
    assert result.calls_of("prepare")[0].signals_sent == ["SIGTERM"]


def test_driver_ignoring_sigterm_is_sigkilled_after_the_graceful_timeout(root: Path) -> None:
    job = ge.Job(script=["sleep 30"], variables={"FAKE_IGNORE_TERM": "1"})
    result = run(root, job, cancel_at=("build_script", 0.3), graceful_kill_timeout=1.0,
                 force_kill_timeout=2.0)
    assert result.status == "canceled", result.plain_log
    build = result.calls_of("build_script")[0]
    assert build.signals_sent == ["SIGTERM", "SIGKILL"]
    assert build.signal == 9 and build.exit_code == -1
    assert 1.0 <= build.duration < 4.0


def test_job_timeout_cancels_everything_but_cleanup(root: Path) -> None:
    job = ge.Job(script=["sleep 30"], after_script=["echo never"], timeout=2)
    result = run(root, job)
    assert result.status == "timedout", result.plain_log
    assert result.failure_reason == "job_execution_timeout"
    assert "Job failed: execution took longer than 2s seconds" in result.plain_log
    assert "after_script" not in result.stages
    assert result.stages[-1] == "cleanup"
    assert result.duration < 8


def test_runner_script_timeout_runs_after_script_as_timedout(root: Path) -> None:
    job = ge.Job(script=["sleep 30"], after_script=["echo after status=$CI_JOB_STATUS"],
                 script_timeout="1s")
    result = run(root, job)
    assert result.status == "timedout", result.plain_log
    assert "after status=timedout\n" in result.plain_log
    assert "step_script could not run to completion because the timeout was exceeded" in (
        result.plain_log)
    assert result.duration < 8


# --- config stage ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdout", "status", "message"),
    [("", "success", None),
     ("null", "success", None),
     ("\n", "system_failure", "error while parsing JSON output: unexpected end of JSON input"),
     ('{"builds_dir": "/x"} trailing', "system_failure", "error while parsing JSON output"),
     ('{"builds_dir": "/x"}{}', "system_failure", "error while parsing JSON output"),
     ('{"job_env": {"A": 1}}', "system_failure", "cannot unmarshal number"),
     ('["builds_dir"]', "system_failure", "cannot unmarshal array"),
     ('{"builds_dir": ""}', "failed", "the builds_dir is not configured")],
)
def test_config_output_edge_cases(root: Path, stdout: str, status: str,
                                  message: str | None) -> None:
    job = ge.Job(script=["echo ran"], variables={"FAKE_CONFIG_STDOUT": stdout})
    result = run(root, job, builds_dir=str(root / "toml-builds"),
                 cache_dir=str(root / "toml-cache"))
    assert result.status == status, result.plain_log
    if status == "success":
        assert f"{root}/toml-builds/group/project" in result.plain_log
        assert "Using Custom executor..." in result.plain_log
    else:
        assert message is not None and message in result.plain_log
        attempts = 1 if status == "failed" else 3
        assert result.stages.count("config") == attempts


def test_config_json_keys_are_case_insensitive_and_shared_layout(root: Path) -> None:
    out = json.dumps({"BUILDS_DIR": f"{root}/b", "Cache_Dir": f"{root}/c",
                      "builds_dir_is_shared": True, "driver": {"name": "x"}, "unknown": [1, 2]})
    job = ge.Job(script=["pwd"], variables={"FAKE_CONFIG_STDOUT": out},
                 concurrent_project_id=3)
    result = run(root, job)
    assert result.status == "success", result.plain_log
    assert f"{root}/b/t3stT0k3/3/group/project\n" in result.plain_log
    assert "Using Custom executor with driver x..." in result.plain_log


def test_custom_env_wins_over_job_env(root: Path) -> None:
    out = '{"job_env": {"CUSTOM_ENV_CI_JOB_NAME": "from-job-env", "FAKE_DRIVER_JOB_ENV": "y"}}'
    job = ge.Job(script=["true"], variables={"FAKE_CONFIG_STDOUT": out})
    result = run(root, job, builds_dir=str(root / "b"), cache_dir=str(root / "c"))
    assert result.status == "success", result.plain_log
    assert "job name         => test-job" in result.plain_log
    assert "job_env          => y" in result.plain_log


def test_missing_builds_dir_is_a_configuration_error(root: Path) -> None:
    config = make_config(root, config_exec=None)
    result = ge.run_job(config, ge.Job(script=["true"]), timeout=60)
    assert result.status == "failed"
    assert result.failure_reason == "config_error"
    assert "the builds_dir is not configured" in result.plain_log
    assert result.stages == ["cleanup"]


# --- output, variables, masking ------------------------------------------------------------


def test_large_output_arrives_intact(root: Path) -> None:
    result = run(root, ge.Job(script=["seq 1 200000"]))
    assert result.status == "success"
    expected = "".join(f"{i}\n" for i in range(1, 200001))
    assert expected in result.log
    assert result.calls_of("build_script")[0].output_text.count("\n") >= 200000


def test_variable_values_survive_quoting_and_expansion(root: Path) -> None:
    weird = "it's \"quoted\" \\ back\nnew line\ttab ünï € $HOME `id` ;|&"
    job = ge.Job(
        script=['printf "raw=%s\\n" "$RAW"', 'printf "expanded=%s\\n" "$EXPANDED"',
                'printf "ref=%s\\n" "$REF"', 'printf "weird=%q\\n" "$WEIRD"'],
        variables={"RAW": "$VARIABLE$WITH$DOLLARS$$", "EXPANDED": "a$$b",
                   "REF": "${CI_JOB_NAME}-x", "WEIRD": weird},
        raw_variables={"RAW", "WEIRD"})
    result = run(root, job)
    assert result.status == "success", result.plain_log
    log = result.plain_log
    assert "raw=$VARIABLE$WITH$DOLLARS$$\n" in log
    assert "expanded=a$b\n" in log
    assert "ref=test-job-x\n" in log
    quoted = subprocess.run(["bash", "-c", 'printf "%q" "$1"', "_", weird],
                            capture_output=True, text=True, check=True).stdout
    assert f"weird={quoted}\n" in log


def test_masked_values_and_the_job_token(root: Path) -> None:
    job = ge.Job(script=['echo "secret=$MY_SECRET"', 'echo "token=$CI_JOB_TOKEN"'],
                 variables={"MY_SECRET": "s3cr3t-value-1234"}, masked_variables={"MY_SECRET"})
    result = run(root, job)
    assert result.status == "success"
    assert "secret=[MASKED]\n" in result.log and "token=[MASKED]\n" in result.log
    assert "s3cr3t-value-1234" not in result.log
    assert "secret=s3cr3t-value-1234\n" in result.raw_log
    assert job.token in result.masked_values
    # The fake driver itself never prints a secret.
    for call in result.calls:
        if call.kind != "run":
            assert job.token not in call.output_text
    assert job.token not in result.runner_log


def test_file_variables_hold_content_and_are_removed(root: Path) -> None:
    job = ge.Job(script=['cat "$MY_FILE"', 'echo "path=$MY_FILE"'],
                 file_variables={"MY_FILE": "line one\nline two"})
    result = run(root, job)
    assert result.status == "success", result.plain_log
    path = f"{root}/builds/group/project.tmp/MY_FILE"
    assert "line one\nline two" in result.plain_log
    assert f"path={path}\n" in result.plain_log
    assert not os.path.exists(path)  # cleanup_file_variables removed it


def test_demo_main(root: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DRIVER_ROOT", str(root))
    code = ge.demo_main(["--driver", FAKE_DRIVER, "--script", "echo demo-output", "--plain"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "demo-output\n" in out and out.endswith("Job status: success\n")
    code = ge.demo_main(["--driver", FAKE_DRIVER, "--job", '{"script": ["exit 5"]}'])
    out = capsys.readouterr().out
    assert code == 1 and out.endswith("Job status: failed (exit code 5)\n")


# --- the Go-compatible helpers -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "plain", "with space", "it's", "back\\slash", "new\nline",
                                   "tab\tand\rcr", "ünïcödé €", "$HOME `id` $(id)", "\x01\x7f",
                                   "'\"'\"'", "*?[a]{b,c}~"])
def test_shell_escape_round_trips_through_bash(value: str) -> None:
    out = subprocess.run(["bash", "-c", "printf '%s' " + ge.shell_escape(value)],
                         capture_output=True, check=True).stdout
    assert out == value.encode()


def test_shell_escape_matches_the_runner() -> None:
    assert ge.shell_escape("") == "''"
    assert ge.shell_escape("/builds/group/project") == "/builds/group/project"
    assert ge.shell_escape("a b") == "$'a b'"
    assert ge.shell_escape("\x1b[32;1m$ echo\x1b[0;m") == "$'\\x1b[32;1m$ echo\\x1b[0;m'"
    assert ge.shell_escape("é") == "$'\\xc3\\xa9'"


@pytest.mark.parametrize(("data", "code"),
                         [(b"42", 42), (b"42\n", 42), (b"42\n\nTesting...", 42), (b"0", 0),
                          (b"-1", -1), (b"+7", 7), (b" 42", None), (b"42 ", None),
                          (b"invalid", None), (b"", None), (b"4_2", None),
                          (b"99999999999999999999", None)])
def test_parse_build_exit_code(data: bytes, code: int | None) -> None:
    assert ge.parse_build_exit_code(data) == code


def test_parse_config_output() -> None:
    assert ge.parse_config_output(b"") is None
    with pytest.raises(ge.ConfigParseError, match="unexpected end of JSON input"):
        ge.parse_config_output(b"\n")
    with pytest.raises(ge.ConfigParseError):
        ge.parse_config_output(b'{"a": 1} x')
    with pytest.raises(ge.ConfigParseError):
        ge.parse_config_output(b'{"builds_dir": NaN}')
    parsed = ge.parse_config_output(b' {"Builds_Dir": "/b", "hostname": null, '
                                    b'"driver": {"NAME": "n", "version": "v"}, '
                                    b'"job_env": {"K": "V"}, "extra": {}}\n')
    assert parsed is not None
    assert parsed.builds_dir == "/b" and parsed.hostname is None
    assert (parsed.driver_name, parsed.driver_version) == ("n", "v")
    assert parsed.job_env == {"K": "V"}


def test_go_helpers() -> None:
    env = {"A": "1", "B": "two"}

    def lookup(name: str) -> str:
        return "$" if name == "$" else env.get(name, "")

    assert ge.go_expand("$A-${B}-$$-$C-${", lookup) == "1-two-$--"
    assert ge.go_expand("no dollars", lookup) == "no dollars"
    assert ge.go_parse_duration("1h30m") == 5400.0
    assert ge.go_parse_duration("1.5s") == 1.5
    assert ge.go_parse_duration("500ms") == 0.5
    assert ge.go_parse_duration("0") == 0.0
    assert ge.go_parse_duration("5") is None and ge.go_parse_duration("") is None
    assert ge.go_duration_str(3) == "3s" and ge.go_duration_str(3600) == "1h0m0s"
    assert ge.go_duration_str(0.05) == "50ms" and ge.go_duration_str(90) == "1m30s"
    assert ge.go_quote('a"b\n') == '"a\\"b\\n"'
