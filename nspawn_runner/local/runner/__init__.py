"""An emulation of how gitlab-runner 19.x drives a custom-executor driver, used by
`nspawn-runner exec` to run a .gitlab-ci.yml job locally through the very same stages, and by
the tests (tests/gitlab_emulator.py) in place of the real runner, which cannot be downloaded
where this project is developed.

It follows ../shared/custom-executor-protocol.md (gitlab-runner 19.4, executors/custom,
common/build.go, shells/), where the code decides: the per-attempt temp dir with
response.json, the call environment in the runner's order, config (strict JSON), prepare, one
run call per stage with a fresh script in the 19.x bash format, cleanup, the exit-code
mapping, retries, the stage order and skipping, CI_JOB_STATUS, process groups with SIGTERM
then SIGKILL, cancel, abort and timeouts, and a masked job log. Stdlib only.

    result = run_job(RunnerConfig(run_exec=[...], ...), Job(script=["make test"]))
"""

from __future__ import annotations

from nspawn_runner.local.runner.configout import ConfigOutput, ConfigParseError, parse_config_output
from nspawn_runner.local.runner.gocompat import (
    go_atoi,
    go_bool,
    go_duration_str,
    go_expand,
    go_json_dumps,
    go_parse_duration,
    go_path_join,
    go_quote,
    parse_build_exit_code,
    shell_escape,
    strip_ansi,
)
from nspawn_runner.local.runner.joblog import mask_text
from nspawn_runner.local.runner.jobrun import JobRun, job_from_dict, run_job
from nspawn_runner.local.runner.model import (
    ANSI_BOLD_CYAN,
    ANSI_BOLD_GREEN,
    ANSI_BOLD_RED,
    ANSI_CLEAR,
    ANSI_RESET,
    ANSI_YELLOW,
    BUILD_FAILURE_EXIT_CODE,
    CANCELED,
    CONFIGURATION_ERROR,
    DEADLINE_EXCEEDED,
    DEFAULT_AFTER_SCRIPT_TIMEOUT,
    DEFAULT_CACHE_REQUEST_TIMEOUT,
    DEFAULT_EXEC_TIMEOUT,
    DEFAULT_FORCE_KILL_TIMEOUT,
    DEFAULT_GRACEFUL_KILL_TIMEOUT,
    FEATURE_FLAGS,
    JOB_CANCELED,
    JOB_EXECUTION_TIMEOUT,
    MASKED,
    PREPARATION_RETRIES,
    RUNNER_ARCH,
    RUNNER_REVISION,
    RUNNER_SYSTEM_FAILURE,
    RUNNER_VERSION,
    SCRIPT_FAILURE,
    STAGE_DESCRIPTIONS,
    SYSTEM_FAILURE_EXIT_CODE,
    WAIT_FOR_BUILD_FINISH_TIMEOUT,
    ArtifactSpec,
    CacheSpec,
    CallRecord,
    Job,
    JobResult,
    JobStatus,
    JobVariable,
    RunnerConfig,
    ServiceSpec,
)
from nspawn_runner.local.runner.payload import job_payload, repo_url
from nspawn_runner.local.runner.process import map_exit

__all__ = [
    "ANSI_BOLD_CYAN",
    "ANSI_BOLD_GREEN",
    "ANSI_BOLD_RED",
    "ANSI_CLEAR",
    "ANSI_RESET",
    "ANSI_YELLOW",
    "BUILD_FAILURE_EXIT_CODE",
    "CANCELED",
    "CONFIGURATION_ERROR",
    "DEADLINE_EXCEEDED",
    "DEFAULT_AFTER_SCRIPT_TIMEOUT",
    "DEFAULT_CACHE_REQUEST_TIMEOUT",
    "DEFAULT_EXEC_TIMEOUT",
    "DEFAULT_FORCE_KILL_TIMEOUT",
    "DEFAULT_GRACEFUL_KILL_TIMEOUT",
    "FEATURE_FLAGS",
    "JOB_CANCELED",
    "JOB_EXECUTION_TIMEOUT",
    "MASKED",
    "PREPARATION_RETRIES",
    "RUNNER_ARCH",
    "RUNNER_REVISION",
    "RUNNER_SYSTEM_FAILURE",
    "RUNNER_VERSION",
    "SCRIPT_FAILURE",
    "STAGE_DESCRIPTIONS",
    "SYSTEM_FAILURE_EXIT_CODE",
    "WAIT_FOR_BUILD_FINISH_TIMEOUT",
    "ArtifactSpec",
    "CacheSpec",
    "CallRecord",
    "ConfigOutput",
    "ConfigParseError",
    "Job",
    "JobResult",
    "JobRun",
    "JobStatus",
    "JobVariable",
    "RunnerConfig",
    "ServiceSpec",
    "go_atoi",
    "go_bool",
    "go_duration_str",
    "go_expand",
    "go_json_dumps",
    "go_parse_duration",
    "go_path_join",
    "go_quote",
    "job_from_dict",
    "job_payload",
    "map_exit",
    "mask_text",
    "parse_build_exit_code",
    "parse_config_output",
    "repo_url",
    "run_job",
    "shell_escape",
    "strip_ansi",
]
