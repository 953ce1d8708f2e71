"""A build's state: its variables (expanded as the runner does), settings read from
them, and its directories (build.go StartBuild)."""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from nspawn_runner.local.runner.gocompat import (
    go_atoi,
    go_bool,
    go_expand,
    go_json_dumps,
    go_path_join,
)
from nspawn_runner.local.runner.joblog import _JobLog, _RunnerLog
from nspawn_runner.local.runner.model import (
    CONFIGURATION_ERROR,
    DEFAULT_CACHE_REQUEST_TIMEOUT,
    FEATURE_FLAGS,
    RUNNER_ARCH,
    RUNNER_REVISION,
    RUNNER_VERSION,
    CallRecord,
    Job,
    JobVariable,
    RunnerConfig,
)
from nspawn_runner.local.runner.payload import _server_variables, repo_url
from nspawn_runner.local.runner.process import _BuildError, _Ctx


@dataclass
class _Settings:
    git_strategy: str
    get_sources_attempts: str
    restore_cache_attempts: str
    artifact_download_attempts: str
    cache_request_timeout: int
    after_script_ignore_errors: bool
    debug_trace: bool
    git_checkout: bool
    lfs_skip_smudge: bool
    clean_flags: list[str]
    fetch_flags: list[str]
    errors: list[str]

def _lookup_in(variables: Sequence[JobVariable]) -> Callable[[str], str]:
    """JobVariables.Get: the last definition wins; "$" is itself, shell specials are empty."""

    def lookup(name: str) -> str:
        if name == "$":
            return "$"
        if name in ("*", "#", "@", "!", "?") or name.isdigit():
            return ""
        for var in reversed(variables):
            if var.key == name:
                return var.value
        return ""

    return lookup


def _positive(value: float, default: float) -> float:
    return value if value > 0 else default
class _RunHandle(Protocol):
    """What a build needs of the JobRun driving it (jobrun.py)."""

    job_log: _JobLog
    runner_log: _RunnerLog

    def _stage_started(self, stage: str) -> None: ...

    def _set_cancel_target(self, ctx: _Ctx) -> None: ...

    def _script_failed(self, project_dir: str, variables: dict[str, str]) -> None: ...


class _BuildState:
    """common.Build for one job: variables, directories."""

    def __init__(self, config: RunnerConfig, job: Job, run: _RunHandle) -> None:
        self.config = config
        self.job = job
        self.run_handle = run
        self.log = run.job_log
        self.runner_log = run.runner_log
        self.calls: list[CallRecord] = []
        self.tempdirs: list[str] = []
        self._calls_lock = threading.Lock()
        self.root_dir = ""
        self.build_dir = ""
        self.cache_dir = ""
        self.hostname = ""
        self.shell = config.shell
        self.job_status = "running"
        self.server_vars = _server_variables(config, job)
        self.feature_flags = self._resolve_feature_flags()
        self.settings = self._settings()
        self.log.secrets = list(dict.fromkeys(v.value for v in self.all_variables()
                                              if v.masked and v.value))

    # -- variables ---------------------------------------------------------------------

    def _resolve_feature_flags(self) -> dict[str, bool]:
        flags = dict(FEATURE_FLAGS)
        for var in self.server_vars:
            if var.key in flags:
                parsed = go_bool(var.value)
                if parsed is not None:
                    flags[var.key] = parsed
        flags.update({k: v for k, v in self.config.feature_flags.items() if k in flags})
        return flags

    def ff(self, name: str) -> bool:
        return self.feature_flags.get(name, False)

    def all_variables(self) -> list[JobVariable]:
        """Build.GetAllVariables(), expanded."""
        config = self.config
        job = self.job
        variables = [JobVariable(k, "true" if v else "false", internal=True)
                     for k, v in self.feature_flags.items()]
        if job.image:
            variables.append(JobVariable("CI_JOB_IMAGE", job.image, internal=True))
        variables.append(JobVariable("CI_RUNNER_SHORT_TOKEN", config.short_token,
                                     internal=True))
        for entry in config.environment:
            key, sep, value = entry.partition("=")
            if sep:
                variables.append(JobVariable(key, value, internal=True))
        variables += [
            JobVariable("CI_BUILDS_DIR", self.root_dir, internal=True),
            JobVariable("CI_PROJECT_DIR", self.build_dir, internal=True),
            JobVariable("CI_CONCURRENT_ID", str(job.concurrent_id), internal=True),
            JobVariable("CI_CONCURRENT_PROJECT_ID", str(job.concurrent_project_id),
                        internal=True),
            JobVariable("CI_SERVER", "yes", internal=True),
            JobVariable("CI_JOB_STATUS", "running", internal=True),
            JobVariable("CI_JOB_TIMEOUT", str(job.timeout), internal=True),
        ]
        variables += [v for v in self.server_vars if v.key not in FEATURE_FLAGS]
        variables += [
            JobVariable("CI_SHARED_ENVIRONMENT", "true", internal=True),
            JobVariable("CI_RUNNER_VERSION", RUNNER_VERSION, internal=True),
            JobVariable("CI_RUNNER_REVISION", RUNNER_REVISION, internal=True),
            JobVariable("CI_RUNNER_EXECUTABLE_ARCH", f"linux/{RUNNER_ARCH}", internal=True),
            JobVariable("RUNNER_TEMP_PROJECT_DIR", self.build_dir + ".tmp", internal=True),
        ]

        lookup = _lookup_in(variables)
        expanded = [v if v.raw else JobVariable(v.key, go_expand(v.value, lookup), v.public,
                                                v.internal, v.masked, v.file, v.raw)
                    for v in variables]
        if self.job_status != "running":
            expanded = [JobVariable("CI_JOB_STATUS", self.job_status, internal=True)
                        if v.key == "CI_JOB_STATUS" else v for v in expanded]
        return expanded

    def value(self, key: str) -> str:
        for var in reversed(self.all_variables()):
            if var.key == key:
                return var.value
        return ""

    def has(self, key: str) -> bool:
        return any(v.key == key for v in self.all_variables())

    def expand(self, text: str) -> str:
        return go_expand(text, _lookup_in(self.all_variables()))

    def services_variable(self) -> JobVariable:
        if not self.job.services:
            return JobVariable("CI_JOB_SERVICES", "")
        services = [{"name": s.name, "alias": s.alias, "entrypoint": s.entrypoint,
                     "command": s.command} for s in self.job.services]
        return JobVariable("CI_JOB_SERVICES", go_json_dumps(services).rstrip("\n"))

    def _settings(self) -> _Settings:
        errors: list[str] = []
        strategy = self.value("GIT_STRATEGY")
        if strategy not in ("clone", "fetch", "none", "empty"):
            if strategy:
                errors.append(f"invalid GIT_STRATEGY {strategy!r}")
            strategy = "fetch"
        cache_timeout = DEFAULT_CACHE_REQUEST_TIMEOUT
        raw_timeout = self.value("CACHE_REQUEST_TIMEOUT")
        if raw_timeout:
            parsed = go_atoi(raw_timeout)
            if parsed is None:
                errors.append(f"invalid CACHE_REQUEST_TIMEOUT {raw_timeout!r}")
            else:
                cache_timeout = parsed
        ignore = go_bool(self.value("AFTER_SCRIPT_IGNORE_ERRORS") or "true")
        checkout = go_bool(self.value("GIT_CHECKOUT") or "true")
        clean_flags = (self.value("GIT_CLEAN_FLAGS") or "-ffdx").split()
        fetch_flags = (self.value("GIT_FETCH_EXTRA_FLAGS") or "--prune --quiet").split()
        return _Settings(
            git_strategy=strategy,
            get_sources_attempts=self.value("GET_SOURCES_ATTEMPTS"),
            restore_cache_attempts=self.value("RESTORE_CACHE_ATTEMPTS"),
            artifact_download_attempts=self.value("ARTIFACT_DOWNLOAD_ATTEMPTS"),
            cache_request_timeout=cache_timeout,
            after_script_ignore_errors=True if ignore is None else ignore,
            debug_trace=bool(go_bool(self.value("CI_DEBUG_TRACE") or "false")),
            git_checkout=True if checkout is None else checkout,
            lfs_skip_smudge=bool(go_bool(self.value("GIT_LFS_SKIP_SMUDGE") or "false")),
            clean_flags=[] if clean_flags == ["none"] else clean_flags,
            fetch_flags=[] if fetch_flags == ["none"] else fetch_flags,
            errors=errors,
        )

    def attempts(self, raw: str, stage: str) -> int:
        if not raw:
            return 1
        value = go_atoi(raw)
        if value is None:
            self.log.warning(f"invalid number of attempts {raw!r} for stage {stage}, using 1")
            return 1
        return value

    # -- directories (build.go StartBuild) ------------------------------------------------

    def project_unique_dir(self, shared: bool) -> str:
        parts = urlsplit(repo_url(self.config, self.job))
        slug = posixpath.normpath(parts.path.removesuffix(".git")).lstrip("/")
        if not parts.hostname or slug in ("", ".") or ".." in slug:
            slug = f"project-{self.job.project_id}"
        if shared:
            slug = go_path_join(self.config.short_token, str(self.job.concurrent_project_id),
                                slug)
        if self.settings.git_strategy == "empty":
            slug += "-empty"
        return slug

    def start_build(self, root_dir: str, cache_dir: str, shared: bool) -> None:
        if root_dir == "":
            raise _BuildError("the builds_dir is not configured", CONFIGURATION_ERROR)
        if cache_dir == "":
            raise _BuildError("the cache_dir is not configured", CONFIGURATION_ERROR)
        self.root_dir = root_dir
        self.cache_dir = go_path_join(cache_dir, self.project_unique_dir(False))
        self.build_dir = go_path_join(root_dir, self.project_unique_dir(shared))

    @property
    def tmp_project_dir(self) -> str:
        return self.build_dir + ".tmp"
