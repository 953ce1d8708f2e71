"""The runner's public face: run a job (in a thread, cancellable), get a JobResult."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Literal

from nspawn_runner.local.runner.build import _Build
from nspawn_runner.local.runner.joblog import _JobLog, _RunnerLog
from nspawn_runner.local.runner.model import (
    CANCELED,
    JOB_CANCELED,
    JOB_EXECUTION_TIMEOUT,
    RUNNER_SYSTEM_FAILURE,
    SCRIPT_FAILURE,
    CacheSpec,
    Job,
    JobResult,
    JobStatus,
    RunnerConfig,
)
from nspawn_runner.local.runner.process import _BuildError, _Ctx, _CtxError, _Err


def _outcome(err: _Err | None) -> tuple[JobStatus, str | None, int | None]:
    if err is None:
        return "success", None, None
    if isinstance(err, _BuildError):
        reason = err.failure_reason
        if reason == JOB_CANCELED:
            return "canceled", reason, None
        if reason == JOB_EXECUTION_TIMEOUT:
            return "timedout", reason, None
        if reason == RUNNER_SYSTEM_FAILURE:
            return "system_failure", reason, None
        return "failed", reason, err.exit_code if reason == SCRIPT_FAILURE else None
    if isinstance(err, _CtxError):
        return ("canceled", JOB_CANCELED, None) if err.reason == CANCELED else (
            "timedout", JOB_EXECUTION_TIMEOUT, None)
    return "system_failure", RUNNER_SYSTEM_FAILURE, None


class JobRun:
    """One job in flight. ``start()`` runs it in a thread; ``cancel()`` is a UI cancel (while
    the steps run only they stop: after_script, *_on_failure, cleanup_file_variables and
    cleanup still run; before the steps it cancels the whole job; after them it does nothing);
    ``abort()`` cancels the whole job context (then only cleanup runs)."""

    def __init__(self, config: RunnerConfig, job: Job, *,
                 live_output: Callable[[str], None] | None = None,
                 on_script_failure: Callable[[str, dict[str, str]], None] | None = None,
                 ) -> None:
        """`on_script_failure(project_dir, variables)` is called when a step of the job's
        script fails, before after_script runs, with the job's expanded variables (exec
        --shell-on-failure)."""
        self.config = config
        self.job = job
        self._on_script_failure = on_script_failure
        self.job_log = _JobLog(live_output)
        self.runner_log = _RunnerLog()
        self._lock = threading.Condition()
        self._job_ctx: _Ctx | None = None
        self._cancel_target: _Ctx | None = None
        self._pending: list[str] = []
        self._stage_starts: dict[str, float] = {}
        self._current_stage: str | None = None
        self._thread: threading.Thread | None = None
        self._result: JobResult | None = None
        self._done = threading.Event()

    # -- control --------------------------------------------------------------------------

    def start(self) -> JobRun:
        if self._thread is not None:
            raise RuntimeError("job already started")
        self._thread = threading.Thread(target=self._main, name=f"job-{self.job.job_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def run(self) -> JobResult:
        """Run the job in the calling thread."""
        self._main()
        assert self._result is not None
        return self._result

    def wait(self, timeout: float | None = None) -> JobResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.job.job_id} still running after {timeout} s")
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """A cancel from the UI or API."""
        with self._lock:
            if self._cancel_target is None:
                self._pending.append("cancel")
                return
            target = self._cancel_target
        self.runner_log.log("info", "cancel requested", stage=self._current_stage)
        target.cancel()

    def abort(self) -> None:
        """The job is gone server-side (or the runner is stopping): cancel everything."""
        with self._lock:
            if self._job_ctx is None:
                self._pending.append("abort")
                return
            target = self._job_ctx
        self.runner_log.log("info", "abort requested", stage=self._current_stage)
        target.cancel()

    def schedule(self, action: Literal["cancel", "abort"], stage: str, delay: float) -> None:
        """Cancel or abort ``delay`` seconds after the driver was first called for ``stage``
        (a run stage name such as "build_script", or config/prepare/cleanup)."""
        if stage == "step_script":
            stage = "build_script"

        def waiter() -> None:
            with self._lock:
                while stage not in self._stage_starts and not self._done.is_set():
                    self._lock.wait(0.05)
                if self._done.is_set():
                    return
            if self._done.wait(delay):
                return
            if action == "cancel":
                self.cancel()
            else:
                self.abort()

        threading.Thread(target=waiter, name=f"{action}-at-{stage}", daemon=True).start()

    # -- state ----------------------------------------------------------------------------

    @property
    def current_stage(self) -> str | None:
        return self._current_stage

    def wait_for_stage(self, stage: str, timeout: float) -> bool:
        """Wait until the driver was called for ``stage``; False on timeout or job end."""
        end = time.monotonic() + timeout
        with self._lock:
            while stage not in self._stage_starts:
                left = end - time.monotonic()
                if left <= 0 or self._done.is_set():
                    return stage in self._stage_starts
                self._lock.wait(min(left, 0.05))
        return True

    @property
    def log_text(self) -> str:
        return self.job_log.text()

    # -- internals -------------------------------------------------------------------------

    def _stage_started(self, stage: str) -> None:
        with self._lock:
            self._current_stage = stage
            self._stage_starts.setdefault(stage, time.monotonic())
            self._lock.notify_all()

    def _script_failed(self, project_dir: str, variables: dict[str, str]) -> None:
        if self._on_script_failure is not None:
            self._on_script_failure(project_dir, variables)

    def _set_cancel_target(self, ctx: _Ctx) -> None:
        with self._lock:
            self._cancel_target = ctx

    def _main(self) -> None:
        started = time.monotonic()
        build: _Build | None = None
        err: _Err | None
        try:
            build = _Build(self.config, self.job, self)
            job_ctx = _Ctx(None, float(self.job.timeout) if self.job.timeout > 0 else 7200.0)
            with self._lock:
                self._job_ctx = job_ctx
                self._cancel_target = job_ctx
                pending, self._pending = self._pending, []
            for action in pending:
                job_ctx.cancel()
                self.runner_log.log("info", f"{action} requested before start")
            err = build.run(job_ctx)
        except Exception as exc:  # an emulator bug: report it rather than hang the caller
            err = _Err(f"emulator error: {exc!r}")
            self.runner_log.log("error", "emulator error", error=repr(exc))
        status, reason, exit_code = _outcome(err)
        log = self.job_log
        if err is None:
            log.info("Job succeeded")
        elif status == "system_failure":
            log.error(f"Job failed (system failure): {err}")
        else:
            log.error(f"Job failed: {err}")
        log.flush_live()
        with self._lock:
            self._result = JobResult(
                status=status, failure_reason=reason, exit_code=exit_code,
                error=None if err is None else str(err), log=log.text(),
                raw_log=log.raw_text(), runner_log=self.runner_log.text(),
                calls=list(build.calls) if build else [],
                tempdirs=list(build.tempdirs) if build else [],
                duration=time.monotonic() - started, masked_values=list(log.secrets))
            self._done.set()
            self._lock.notify_all()


def run_job(config: RunnerConfig, job: Job, *,
            cancel_at: tuple[str, float] | None = None,
            abort_at: tuple[str, float] | None = None,
            live_output: Callable[[str], None] | None = None,
            timeout: float | None = None) -> JobResult:
    """Run one job to its end and return what came of it.

    ``cancel_at=("build_script", 3.0)`` cancels like the UI does 3 s after the driver got that
    stage; ``abort_at`` does the same with an abort. ``timeout`` bounds the wait in the caller
    (TimeoutError), independent of the job's own timeout.
    """
    run = JobRun(config, job, live_output=live_output)
    if cancel_at is not None:
        run.schedule("cancel", *cancel_at)
    if abort_at is not None:
        run.schedule("abort", *abort_at)
    run.start()
    return run.wait(timeout)


def job_from_dict(data: Mapping[str, object]) -> Job:
    """A Job from a small dict/JSON: script (str or list), image, after_script, variables,
    masked_variables, steps ({name: lines}), cache ({key, paths, policy, when} or a list),
    git_strategy, timeout, project_path, name."""

    def lines(value: object) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [str(v) for v in value]
        raise ValueError(f"expected a string or a list of strings, got {value!r}")

    def mapping(value: object) -> dict[str, object]:
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {value!r}")
        return {str(k): v for k, v in value.items()}

    if "script" not in data:
        raise ValueError("the job needs a script")
    job = Job(script=lines(data["script"]))
    if data.get("image") is not None:
        job.image = str(data["image"])
    if data.get("after_script") is not None:
        job.after_script = lines(data["after_script"])
    for key, value in mapping(data.get("variables", {})).items():
        job.variables[key] = str(value)
    masked = data.get("masked_variables", [])
    job.masked_variables = set(lines(masked)) if masked else set()
    for name, value in mapping(data.get("steps", {})).items():
        job.extra_steps[name] = lines(value)
    caches = data.get("cache")
    if caches is not None:
        for entry in caches if isinstance(caches, list) else [caches]:
            spec = mapping(entry)
            job.cache.append(CacheSpec(paths=lines(spec.get("paths", [])),
                                       key=str(spec.get("key", "")),
                                       policy=str(spec.get("policy", "pull-push")),
                                       when=str(spec.get("when", "on_success"))))
    if "git_strategy" in data:
        job.git_strategy = None if data["git_strategy"] is None else str(data["git_strategy"])
    for key in ("timeout", "job_id", "project_id"):
        if key in data:
            value = data[key]
            if not isinstance(value, (int, str)):
                raise ValueError(f"{key} must be an integer")
            setattr(job, key, int(value))
    for key in ("project_path", "name", "stage"):
        if key in data:
            setattr(job, key, str(data[key]))
    return job
