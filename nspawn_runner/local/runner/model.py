"""The runner's constants and data model: job variables, cache/artifact entries, the
[[runners]] settings it honours, a job as GitLab hands it out, and what came of it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from nspawn_runner.local.runner.gocompat import strip_ansi

RUNNER_VERSION: Final = "19.4.0"
RUNNER_REVISION: Final = "emulated"
RUNNER_ARCH: Final = "amd64"

BUILD_FAILURE_EXIT_CODE: Final = 1
SYSTEM_FAILURE_EXIT_CODE: Final = 2

PREPARATION_RETRIES: Final = 3
DEFAULT_EXEC_TIMEOUT: Final = 3600.0
DEFAULT_GRACEFUL_KILL_TIMEOUT: Final = 600.0
DEFAULT_FORCE_KILL_TIMEOUT: Final = 10.0
DEFAULT_AFTER_SCRIPT_TIMEOUT: Final = 300.0
WAIT_FOR_BUILD_FINISH_TIMEOUT: Final = 300.0
DEFAULT_CACHE_REQUEST_TIMEOUT: Final = 10

ANSI_BOLD_RED: Final = "\x1b[31;1m"
ANSI_BOLD_GREEN: Final = "\x1b[32;1m"
ANSI_BOLD_CYAN: Final = "\x1b[36;1m"
ANSI_YELLOW: Final = "\x1b[0;33m"
ANSI_RESET: Final = "\x1b[0;m"
ANSI_CLEAR: Final = "\x1b[0K"

MASKED: Final = "[MASKED]"

CANCELED: Final = "canceled"
DEADLINE_EXCEEDED: Final = "deadline_exceeded"

# Failure reasons as GitLab knows them.
SCRIPT_FAILURE: Final = "script_failure"
RUNNER_SYSTEM_FAILURE: Final = "runner_system_failure"
JOB_EXECUTION_TIMEOUT: Final = "job_execution_timeout"
JOB_CANCELED: Final = "canceled"
CONFIGURATION_ERROR: Final = "config_error"

JobStatus = Literal["success", "failed", "system_failure", "canceled", "timedout"]

# A representative set of 19.x feature flags with their defaults. Every one is exported to the
# job like the runner does; the emulator acts on FF_SKIP_NOOP_BUILD_STAGES,
# FF_SET_PERMISSIONS_BEFORE_CLEANUP and FF_USE_GIT_BUNDLE_URIS.
FEATURE_FLAGS: Final[dict[str, bool]] = {
    "FF_NETWORK_PER_BUILD": False,
    "FF_USE_LEGACY_KUBERNETES_EXECUTION_STRATEGY": False,
    "FF_USE_DIRECT_DOWNLOAD": True,
    "FF_SKIP_NOOP_BUILD_STAGES": True,
    "FF_USE_FASTZIP": False,
    "FF_DISABLE_UMASK_FOR_DOCKER_EXECUTOR": False,
    "FF_ENABLE_BASH_EXIT_CODE_CHECK": False,
    "FF_USE_WINDOWS_LEGACY_PROCESS_STRATEGY": False,
    "FF_USE_NEW_BASH_EVAL_STRATEGY": False,
    "FF_USE_POWERSHELL_PATH_RESOLVER": False,
    "FF_SCRIPT_SECTIONS": False,
    "FF_ENABLE_JOB_CLEANUP": False,
    "FF_POSIXLY_CORRECT_ESCAPES": False,
    "FF_SET_PERMISSIONS_BEFORE_CLEANUP": True,
    "FF_SECRET_RESOLVING_FAILS_IF_MISSING": True,
    "FF_USE_GIT_BUNDLE_URIS": True,
    "FF_CLEAN_UP_FAILED_CACHE_EXTRACT": False,
    "FF_TIMESTAMPS": False,
    "FF_GIT_URLS_WITHOUT_TOKENS": False,
    "FF_MASK_ALL_DEFAULT_TOKENS": True,
    "FF_USE_EXPONENTIAL_BACKOFF_STAGE_RETRY": True,
    "FF_HASH_CACHE_KEYS": False,
}

STAGE_DESCRIPTIONS: Final[dict[str, str]] = {
    "prepare_script": "Preparing environment",
    "get_sources": "Getting source from Git repository",
    "clear_worktree": "Deleting all tracked and untracked files due to source fetch failure",
    "restore_cache": "Restoring cache",
    "download_artifacts": "Downloading artifacts",
    "after_script": "Running after_script",
    "archive_cache": "Saving cache for successful job",
    "archive_cache_on_failure": "Saving cache for failed job",
    "upload_artifacts_on_failure": "Uploading artifacts for failed job",
    "upload_artifacts_on_success": "Uploading artifacts for successful job",
    "cleanup_file_variables": "Cleaning up project directory and file based variables",
}


@dataclass(frozen=True)
class JobVariable:
    """One job variable as the runner holds it."""

    key: str
    value: str
    public: bool = True
    internal: bool = False
    masked: bool = False
    file: bool = False
    raw: bool = False

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "value": self.value, "public": self.public,
                "masked": self.masked, "file": self.file, "raw": self.raw}


@dataclass
class CacheSpec:
    """One ``cache:`` entry of the job."""

    paths: list[str]
    key: str = ""
    untracked: bool = False
    policy: str = "pull-push"
    when: str = "on_success"
    fallback_keys: list[str] = field(default_factory=list)


@dataclass
class ArtifactSpec:
    """One ``artifacts:`` entry of the job (uploads go through ``gitlab-runner
    artifacts-uploader``; a failure there is fatal, as in the runner)."""

    paths: list[str]
    name: str = ""
    when: str = "on_success"
    expire_in: str = ""
    untracked: bool = False
    exclude: list[str] = field(default_factory=list)
    artifact_type: str = "archive"
    artifact_format: str = "zip"


@dataclass
class ServiceSpec:
    """One ``services:`` entry (only reaches the driver through ``CI_JOB_SERVICES``)."""

    name: str
    alias: str = ""
    entrypoint: list[str] | None = None
    command: list[str] | None = None


@dataclass
class RunnerConfig:
    """The ``[[runners]]`` / ``[runners.custom]`` settings the emulator honours.

    The ``*_exec`` fields are whole argv lists (``exec`` followed by its ``*_args``). Timeouts are
    in seconds; a value <= 0 falls back to the default like config.toml does.
    """

    run_exec: list[str]
    config_exec: list[str] | None = None
    prepare_exec: list[str] | None = None
    cleanup_exec: list[str] | None = None
    builds_dir: str | None = None
    cache_dir: str | None = None
    shell: str = "bash"
    graceful_kill_timeout: float = DEFAULT_GRACEFUL_KILL_TIMEOUT
    force_kill_timeout: float = DEFAULT_FORCE_KILL_TIMEOUT
    config_exec_timeout: float = DEFAULT_EXEC_TIMEOUT
    prepare_exec_timeout: float = DEFAULT_EXEC_TIMEOUT
    cleanup_exec_timeout: float = DEFAULT_EXEC_TIMEOUT
    # Pause between config+prepare attempts (PreparationRetryInterval, 3 s in the runner).
    retry_delay: float = 3.0
    # Pause before retrying get_sources / restore_cache / download_artifacts: it starts here
    # and doubles up to the maximum.
    stage_retry_delay: float = 1.0
    stage_retry_max_delay: float = 5.0
    # The default RUNNER_AFTER_SCRIPT_TIMEOUT and how long the runner waits for the stages to
    # wind down after the job context ended.
    after_script_timeout: float = DEFAULT_AFTER_SCRIPT_TIMEOUT
    build_finish_timeout: float = WAIT_FOR_BUILD_FINISH_TIMEOUT
    # [[runners]] environment = ["K=V"]: they become job variables.
    environment: list[str] = field(default_factory=list)
    runner_id: int = 1
    name: str = "nspawn-runner-emulator"
    short_token: str = "t3stT0k3"
    system_id: str = "s_0123456789ab"
    server_url: str = "https://gitlab.example.com"
    pre_get_sources_script: str = ""
    post_get_sources_script: str = ""
    pre_build_script: str = ""
    post_build_script: str = ""
    # config.toml feature flags; they win over FF_* job variables.
    feature_flags: dict[str, bool] = field(default_factory=dict)
    # The runner process' own environment: None means os.environ. extra_process_env is laid
    # over it (for example PATH with a gitlab-runner helper, or settings for a fake driver).
    process_env: Mapping[str, str] | None = None
    extra_process_env: dict[str, str] = field(default_factory=dict)
    # Leave the job's machine running: the cleanup call is not made (exec --keep).
    skip_cleanup: bool = False


@dataclass
class Job:
    """A job as GitLab would hand it to the runner."""

    script: list[str]
    job_id: int = 1001
    name: str = "test-job"
    stage: str = "test"
    project_id: int = 42
    project_path: str = "group/project"
    image: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    masked_variables: set[str] = field(default_factory=set)
    raw_variables: set[str] = field(default_factory=set)
    file_variables: dict[str, str] = field(default_factory=dict)
    extra_variables: list[JobVariable] = field(default_factory=list)
    # Further steps, in order: {"release": [...]} is sent as stage step_release.
    extra_steps: dict[str, list[str]] = field(default_factory=dict)
    after_script: list[str] | None = None
    cache: list[CacheSpec] = field(default_factory=list)
    artifacts: list[ArtifactSpec] = field(default_factory=list)
    services: list[ServiceSpec] = field(default_factory=list)
    # GIT_STRATEGY as a job variable. "none" by default: no git server is reachable. None
    # leaves it unset (the runner then uses "fetch").
    git_strategy: str | None = "none"
    git_depth: int = 20
    ref: str = "main"
    sha: str = "5a8ba4d1f3b1e1a9c0d7e6f5a4b3c2d1e0f9a8b7"
    before_sha: str = "0000000000000000000000000000000000000000"
    pipeline_id: int = 777
    timeout: int = 3600
    # RUNNER_SCRIPT_TIMEOUT / RUNNER_AFTER_SCRIPT_TIMEOUT as Go durations ("5s", "1m").
    script_timeout: str | None = None
    after_script_timeout: str | None = None
    concurrent_id: int = 0
    concurrent_project_id: int = 0
    token: str = "glcbt-64_FAKEjobTOKEN0123456789abcdefXYZ"
    # For `nspawn-runner exec`, which runs a real local job rather than a test's:
    # server_variables replace the emulator's made-up predefined variables (CI_PIPELINE_ID,
    # CI_SERVER_URL, ...) with the caller's; local_sources is an archive (a path inside the
    # machine) that get_sources extracts instead of fetching from a git server;
    # dependency_archives are (job name, archive inside) that download_artifacts extracts;
    # local_artifacts is where upload_artifacts_* writes the job's artifacts (an archive
    # made by the gitlab-runner helper's cache-archiver) instead of uploading them.
    server_variables: list[JobVariable] | None = None
    local_sources: str | None = None
    dependency_archives: list[tuple[str, str]] = field(default_factory=list)
    local_artifacts: str | None = None


@dataclass
class CallRecord:
    """One call of a driver executable."""

    kind: str  # config | prepare | run | cleanup
    stage: str  # the kind, or for run the stage name the driver got
    argv: list[str]
    attempt: int
    tempdir: str
    started: float  # time.monotonic()
    duration: float = 0.0
    exit_code: int | None = None  # None: not started, or the runner gave up waiting
    signal: int | None = None  # the signal the process died of
    signals_sent: list[str] = field(default_factory=list)
    error: str | None = None  # the runner-side error this call produced
    script: str | None = None  # run: the script's content
    script_path: str | None = None
    output: bytearray = field(default_factory=bytearray, repr=False)  # raw, everything it wrote

    @property
    def output_text(self) -> str:
        return self.output.decode("utf-8", "replace")


@dataclass
class JobResult:
    """What came of one job."""

    status: JobStatus
    failure_reason: str | None
    exit_code: int | None  # a script failure's exit code
    error: str | None
    log: str  # the job log as GitLab shows it (masked)
    raw_log: str  # the same without masking
    runner_log: str  # the runner's own log: cleanup output and internal notes
    calls: list[CallRecord]
    tempdirs: list[str]
    duration: float
    masked_values: list[str] = field(default_factory=list)

    @property
    def tempdir(self) -> str | None:
        """The temp dir of the last config+prepare attempt."""
        return self.tempdirs[-1] if self.tempdirs else None

    @property
    def plain_log(self) -> str:
        return strip_ansi(self.log)

    @property
    def stages(self) -> list[str]:
        """Every call in order: config, prepare, run stage names, cleanup."""
        return [c.stage for c in self.calls]

    @property
    def run_stages(self) -> list[str]:
        return [c.stage for c in self.calls if c.kind == "run"]

    def call_summary(self) -> list[tuple[str, int | None, float]]:
        return [(c.stage, c.exit_code, c.duration) for c in self.calls]

    def calls_of(self, stage: str) -> list[CallRecord]:
        return [c for c in self.calls if c.stage == stage]
