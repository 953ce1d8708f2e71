"""One custom executor instance (config, prepare, run, cleanup calls) and the build's
stage sequence (build.go): attempts, timeouts, after_script, cache and artifacts."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

from nspawn_runner.local.runner.configout import ConfigOutput, ConfigParseError, parse_config_output
from nspawn_runner.local.runner.gocompat import (
    go_duration_str,
    go_json_dumps,
    go_parse_duration,
    go_quote,
)
from nspawn_runner.local.runner.joblog import _Buffer, _LineLogger, _RecordSink, _Sink, _Tee
from nspawn_runner.local.runner.model import (
    ANSI_BOLD_CYAN,
    ANSI_RESET,
    BUILD_FAILURE_EXIT_CODE,
    CANCELED,
    CONFIGURATION_ERROR,
    DEADLINE_EXCEEDED,
    DEFAULT_EXEC_TIMEOUT,
    JOB_CANCELED,
    JOB_EXECUTION_TIMEOUT,
    PREPARATION_RETRIES,
    RUNNER_REVISION,
    RUNNER_VERSION,
    SCRIPT_FAILURE,
    STAGE_DESCRIPTIONS,
    SYSTEM_FAILURE_EXIT_CODE,
    CallRecord,
)
from nspawn_runner.local.runner.payload import job_payload
from nspawn_runner.local.runner.process import (
    _BuildError,
    _Ctx,
    _CtxError,
    _Err,
    _run_process,
    map_exit,
)
from nspawn_runner.local.runner.scripts import _BuildScripts
from nspawn_runner.local.runner.state import _positive


class _Executor:
    """One custom executor instance (one config+prepare attempt and its cleanup)."""

    def __init__(self, build: _Build, attempt: int) -> None:
        self.build = build
        self.attempt = attempt
        config = build.config
        self.builds_dir = config.builds_dir or ""
        self.cache_dir = config.cache_dir or ""
        self.shared = False
        self.shell = config.shell
        self.tempdir: str | None = None
        self.response_file = ""
        self.job_env: dict[str, str] = {}
        self.driver_name: str | None = None
        self.driver_version: str | None = None

    # -- calls ---------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        assert self.tempdir is not None
        config = self.build.config
        env = dict(os.environ if config.process_env is None else config.process_env)
        env.update(config.extra_process_env)
        env.update({
            "TMPDIR": self.tempdir,
            "BUILD_FAILURE_EXIT_CODE": str(BUILD_FAILURE_EXIT_CODE),
            "SYSTEM_FAILURE_EXIT_CODE": str(SYSTEM_FAILURE_EXIT_CODE),
            "BUILD_EXIT_CODE_FILE": os.path.join(self.tempdir, "build_exit_code"),
            "JOB_RESPONSE_FILE": self.response_file,
        })
        env.update(self.job_env)
        for var in [*self.build.all_variables(), self.build.services_variable()]:
            key = f"CUSTOM_ENV_{var.key}"
            if "=" in key or "\0" in key or "\0" in var.value:
                continue
            env[key] = var.value
        return env

    def call(self, kind: str, stage: str, argv: list[str], ctx: _Ctx, stdout: _Sink,
             stderr: _Sink | None, script: str | None = None,
             script_path: str | None = None) -> None:
        """Run one driver call to completion; raise the runner's error for its outcome."""
        assert self.tempdir is not None
        build = self.build
        config = build.config
        record = CallRecord(kind=kind, stage=stage, argv=list(argv), attempt=self.attempt,
                            tempdir=self.tempdir, started=time.monotonic(), script=script,
                            script_path=script_path)
        build.add_call(record)
        own = _RecordSink(record.output)
        out_sink = _Tee(stdout, own)
        err_sink = None if stderr is None else _Tee(stderr, own)
        exit_code_file = os.path.join(self.tempdir, "build_exit_code")
        outcome = _run_process(argv, self._env(), self.tempdir, ctx, out_sink, err_sink,
                               config.graceful_kill_timeout, config.force_kill_timeout, record)
        record.duration = time.monotonic() - record.started
        if outcome.returncode is not None:
            record.exit_code = outcome.returncode if outcome.returncode >= 0 else -1
            record.signal = -outcome.returncode if outcome.returncode < 0 else None
        error: _Err | None
        if outcome.start_error is not None:
            error = _Err(outcome.start_error)
        elif outcome.kill_error is not None:
            record.exit_code = None
            error = _Err(outcome.kill_error)
        else:
            assert outcome.returncode is not None
            error = map_exit(outcome.returncode, exit_code_file)
        build.runner_log.log("debug", "driver call finished", stage=stage,
                             exit_code=record.exit_code, duration=f"{record.duration:.3f}s")
        if error is not None:
            record.error = str(error)
            raise error

    # -- Prepare (custom.go) ------------------------------------------------------------

    def prepare(self, job_ctx: _Ctx) -> None:
        build = self.build
        config = build.config
        if not config.run_exec:
            raise _BuildError("custom executor is missing RunExec", CONFIGURATION_ERROR)
        self.tempdir = tempfile.mkdtemp(prefix="custom-executor")
        build.tempdirs.append(self.tempdir)
        self.response_file = os.path.join(self.tempdir, "response.json")
        fd = os.open(self.response_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(go_json_dumps(job_payload(config, build.job)))

        if config.config_exec:
            ctx = job_ctx.child(_positive(config.config_exec_timeout, DEFAULT_EXEC_TIMEOUT))
            buf = _Buffer()
            build.stage_started("config")
            self.call("config", "config", list(config.config_exec), ctx, buf, build.log)
            try:
                parsed = parse_config_output(bytes(buf.data))
            except ConfigParseError as exc:
                raise _Err(f"error while parsing JSON output: {exc}") from exc
            if parsed is not None:
                self._inject(parsed)

        if self.driver_name is None:
            build.log.println("Using Custom executor...")
        elif self.driver_version is None:
            build.log.println(f"Using Custom executor with driver {self.driver_name}...")
        else:
            build.log.println(f"Using Custom executor with driver {self.driver_name} "
                              f"{self.driver_version}...")

        build.start_build(self.builds_dir, self.cache_dir, self.shared)
        if self.shell not in ("bash", "sh"):
            raise _Err(f"shell {self.shell!r} is not supported by the emulator "
                       "(only bash and sh)")

        if not config.prepare_exec:
            return
        ctx = job_ctx.child(_positive(config.prepare_exec_timeout, DEFAULT_EXEC_TIMEOUT))
        build.stage_started("prepare")
        self.call("prepare", "prepare", list(config.prepare_exec), ctx, build.log, None)

    def _inject(self, parsed: ConfigOutput) -> None:
        if parsed.hostname is not None:
            self.build.hostname = parsed.hostname
        if parsed.builds_dir is not None:
            self.builds_dir = parsed.builds_dir
        if parsed.cache_dir is not None:
            self.cache_dir = parsed.cache_dir
        if parsed.builds_dir_is_shared is not None:
            self.shared = parsed.builds_dir_is_shared
        if parsed.has_driver:
            self.driver_name = parsed.driver_name
            self.driver_version = parsed.driver_version
        if parsed.job_env is not None:
            self.job_env = dict(parsed.job_env)
        if parsed.shell is not None:
            self.shell = parsed.shell

    # -- Run ---------------------------------------------------------------------------

    def run(self, stage: str, script: str, ctx: _Ctx) -> None:
        assert self.tempdir is not None
        build = self.build
        script_dir = tempfile.mkdtemp(prefix="script", dir=self.tempdir)
        script_path = os.path.join(script_dir, "script")
        fd = os.open(script_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(script)
        os.chmod(script_path, 0o700)
        if stage == "step_script":
            build.log.warning("Starting with version 17.0 the 'build_script' stage will be "
                              "replaced with 'step_script': "
                              "https://gitlab.com/groups/gitlab-org/-/epics/6112")
            stage = "build_script"
        argv = [*build.config.run_exec, script_path, stage]
        build.stage_started(stage)
        self.call("run", stage, argv, ctx, build.log, None, script=script,
                  script_path=script_path)

    # -- Cleanup -----------------------------------------------------------------------

    def cleanup(self, final: bool = False) -> None:
        """`final`: after the build (not after a failed prepare attempt)."""
        build = self.build
        config = build.config
        if not config.run_exec:
            build.log.warning("custom executor is missing RunExec")
            return
        if self.tempdir is None:
            return
        try:
            if final and config.skip_cleanup:
                build.runner_log.log("info", "cleanup skipped: the machine is kept")
            elif config.cleanup_exec:
                ctx = _Ctx(None, _positive(config.cleanup_exec_timeout, DEFAULT_EXEC_TIMEOUT))
                out = _LineLogger(build.runner_log, "debug", "out")
                err = _LineLogger(build.runner_log, "warning", "err")
                build.stage_started("cleanup")
                try:
                    self.call("cleanup", "cleanup", list(config.cleanup_exec), ctx, out, err)
                except _Err as exc:
                    build.log.warning(f"Cleanup script failed: {exc}")
                finally:
                    out.close()
                    err.close()
        finally:
            shutil.rmtree(self.tempdir, ignore_errors=True)

class _Build(_BuildScripts):
    """common.Build for one job: the stages, in order, with their attempts."""

    # -- stages (build.go) ---------------------------------------------------------------

    def execute_stage(self, ctx: _Ctx, stage: str, ex: _Executor) -> _Err | None:
        reason = ctx.err()
        if reason is not None:
            return _CtxError(reason)
        try:
            script, skip = self.generate(stage)
        except _Err as exc:
            return exc
        if skip and self.ff("FF_SKIP_NOOP_BUILD_STAGES"):
            self.runner_log.log("debug", "Skipping stage (nothing to do)", build_stage=stage)
            return None
        self.log.section_start(stage)
        self.log.println(f"{ANSI_BOLD_CYAN}{self.stage_description(stage)}{ANSI_RESET}")
        error: _Err | None = None
        try:
            ex.run(stage, script, ctx)
        except _Err as exc:
            error = exc
        self.log.section_end(stage)
        if ctx.err() == DEADLINE_EXCEEDED:
            self.log.warning(f"{stage} could not run to completion because the timeout was "
                             "exceeded. For more control over job and script timeouts see: "
                             "https://docs.gitlab.com/ci/runners/configure_runners/"
                             "#set-script-and-after_script-timeouts")
        return error

    @staticmethod
    def stage_description(stage: str) -> str:
        return STAGE_DESCRIPTIONS.get(stage, f"Executing {go_quote(stage)} stage of the job "
                                             "script")

    def attempt_stage(self, ctx: _Ctx, stage: str, ex: _Executor, attempts: int,
                      retry: Callable[[int], _Err | None] | None = None) -> _Err | None:
        if attempts < 1 or attempts > 10:
            return _Err(f"number of attempts out of the range [1, 10] for stage: {stage}")
        delay = self.config.stage_retry_delay
        err: _Err | None = None
        for attempt in range(attempts):
            if retry is not None:
                err = retry(attempt)
                if err is not None:
                    continue
            err = self.execute_stage(ctx, stage, ex)
            if err is None:
                return None
            if attempt == attempts - 1:
                break
            if delay > 0:
                self.log.info(f"Retrying in {go_duration_str(delay)}")
                time.sleep(delay)
                delay = min(delay * 2, self.config.stage_retry_max_delay)
        return err

    def execute_prepare_scripts(self, ctx: _Ctx, ex: _Executor) -> tuple[_Err | None, bool]:
        err = self.execute_stage(ctx, "prepare_script", ex)
        if err is not None:
            return err.wrapped(
                f"prepare environment: {err}. Check "
                "https://docs.gitlab.com/runner/shells/#shell-profile-loading for more "
                "information"), False

        def clear_worktree(attempt: int) -> _Err | None:
            if attempt == 1:
                return self.execute_stage(ctx, "clear_worktree", ex)
            return None

        s = self.settings
        err = self.attempt_stage(ctx, "get_sources", ex,
                                 self.attempts(s.get_sources_attempts, "get_sources"),
                                 clear_worktree)
        if err is None:
            err = self.attempt_stage(ctx, "restore_cache", ex,
                                     self.attempts(s.restore_cache_attempts, "restore_cache"))
        if err is None:
            err = self.attempt_stage(ctx, "download_artifacts", ex,
                                     self.attempts(s.artifact_download_attempts,
                                                   "download_artifacts"))
        return err, True

    def _stage_timeout(self, name: str, default: float, ctx: _Ctx) -> float | None:
        raw = self.value(name)
        result: float | None = default if default > 0 else None
        if raw.strip() == "":
            return result
        parsed = go_parse_duration(raw)
        if parsed is None:
            self.log.warning(f"Ignoring malformed {name} timeout: {raw}")
        elif parsed < 0:
            self.log.warning(f"Ignoring relative {name} timeout: {raw}")
        elif ctx.deadline is not None and parsed > ctx.deadline - time.monotonic():
            self.log.warning(f"{name} timeout: {raw} is longer than job timeout. Setting to job "
                             "timeout")
        elif parsed != 0:
            result = parsed
        return result

    @staticmethod
    def runtime_state(err: _Err | None) -> str:
        if err is None:
            return "success"
        if isinstance(err, _CtxError):
            return "canceled" if err.reason == CANCELED else "timedout"
        if isinstance(err, _BuildError):
            if err.failure_reason == JOB_CANCELED:
                return "canceled"
            if err.failure_reason == JOB_EXECUTION_TIMEOUT:
                return "timedout"
        return "failed"

    def execute_user_scripts(self, ctx: _Ctx, ex: _Executor) -> _Err | None:
        script_timeout = self._stage_timeout("RUNNER_SCRIPT_TIMEOUT", 0, ctx)
        after_timeout = self._stage_timeout("RUNNER_AFTER_SCRIPT_TIMEOUT",
                                            self.config.after_script_timeout, ctx)
        script_ctx = ctx.child(script_timeout)
        self.run_handle._set_cancel_target(script_ctx)
        err: _Err | None = None
        steps = ["script", *self.job.extra_steps]
        for name in steps:
            err = self.execute_stage(script_ctx, f"step_{name.lower()}", ex)
            if err is not None:
                break
        if isinstance(err, _BuildError) and err.failure_reason == SCRIPT_FAILURE and \
                script_ctx.err() is None:
            self.run_handle._script_failed(self.build_dir, {
                v.key: v.value for v in self.all_variables() if not v.file})
        if ctx.err() is None and script_ctx.err() == CANCELED:
            err = _BuildError("canceled", JOB_CANCELED)
            self.log.warning("script canceled externally (UI, API)")
        elif ctx.err() != DEADLINE_EXCEEDED and script_ctx.err() == DEADLINE_EXCEEDED:
            err = _BuildError("script timeout: context deadline exceeded",
                              JOB_EXECUTION_TIMEOUT)
        after_ctx = ctx.child(after_timeout)
        self.job_status = self.runtime_state(err)
        after_err = self.execute_stage(after_ctx, "after_script", ex)
        if after_err is not None and ctx.err() != DEADLINE_EXCEEDED:
            if self.settings.after_script_ignore_errors:
                self.log.warning(f"after_script failed, but job will continue unaffected: "
                                 f"{after_err}")
            elif err is None:
                err = after_err
        return err

    def execute_script(self, ctx: _Ctx, ex: _Executor) -> _Err | None:
        err, cont = self.execute_prepare_scripts(ctx, ex)
        if not cont:
            return err
        if err is None:
            err = self.execute_user_scripts(ctx, ex)
        on_success = err is None
        archive_err = self.execute_stage(
            ctx, "archive_cache" if on_success else "archive_cache_on_failure", ex)
        upload_err = self.execute_stage(
            ctx, "upload_artifacts_on_success" if on_success else "upload_artifacts_on_failure",
            ex)
        cleanup_err = self.execute_stage(ctx, "cleanup_file_variables", ex)
        if cleanup_err is not None:
            self.runner_log.log("warning", "Error while executing file based variables removal "
                                "script", error=str(cleanup_err))
        return err or archive_err or upload_err

    def ctx_error(self, reason: str) -> _BuildError:
        if reason == CANCELED:
            return _BuildError("canceled", JOB_CANCELED)
        return _BuildError(f"execution took longer than {go_duration_str(self.job.timeout)} "
                           "seconds", JOB_EXECUTION_TIMEOUT)

    def run_build(self, job_ctx: _Ctx, ex: _Executor) -> _Err | None:
        """Build.run: the stages in a worker, watched for the job context."""
        run_ctx = job_ctx.child()
        finished = threading.Event()
        box: list[_Err | None] = []

        def worker() -> None:
            try:
                box.append(self.execute_script(run_ctx, ex))
            except Exception as exc:  # a bug in the emulator: surface it as a system failure
                box.append(_Err(f"emulator error: {exc!r}"))
            finally:
                finished.set()

        thread = threading.Thread(target=worker, name="build", daemon=True)
        thread.start()
        while not finished.wait(0.02):
            if job_ctx.err() is not None:
                break
        reason = job_ctx.err()
        if finished.is_set() and reason is None:
            return box[0]
        if reason is None:  # not reachable: the loop only ends on finish or ctx end
            return box[0] if box else None
        run_ctx.cancel()
        if not finished.wait(self.config.build_finish_timeout):
            self.log.warning("Timed out waiting for the build to finish")
        return self.ctx_error(reason)

    def retry_create_executor(self, job_ctx: _Ctx) -> tuple[_Executor | None, _Err | None]:
        err: _Err | None = None
        for attempt in range(1, PREPARATION_RETRIES + 1):
            ex = _Executor(self, attempt)
            try:
                ex.prepare(job_ctx)
                return ex, None
            except _Err as exc:
                err = exc
            ex.cleanup()
            if isinstance(err, _BuildError):
                return None, err
            reason = job_ctx.err()
            if reason is not None:
                return None, self.ctx_error(reason)
            self.log.error(f"Preparation failed: {err}")
            self.log.println(f"Will be retried in {go_duration_str(self.config.retry_delay)} "
                             "...")
            time.sleep(self.config.retry_delay)
        return None, err

    def run(self, job_ctx: _Ctx) -> _Err | None:
        log = self.log
        log.println(f"Running with gitlab-runner {RUNNER_VERSION} ({RUNNER_REVISION})")
        log.println(f"  on {self.config.name} {self.config.short_token}, system ID: "
                    f"{self.config.system_id}")
        for problem in self.settings.errors:
            log.warning(problem)
        log.section_start("prepare_executor")
        log.println(f'{ANSI_BOLD_CYAN}Preparing the "custom" executor{ANSI_RESET}')
        ex, err = self.retry_create_executor(job_ctx)
        log.section_end("prepare_executor")
        if ex is None:
            return err
        try:
            err = self.run_build(job_ctx, ex)
        finally:
            ex.cleanup(final=True)
        return err
