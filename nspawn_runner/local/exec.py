"""`nspawn-runner exec JOB`: run a .gitlab-ci.yml job on this machine, through the very stages a
real gitlab-runner calls (config, prepare, run per stage, cleanup), as subprocesses, with the
scripts gitlab-runner generates (local/runner/), in the machine a real job would get.

Exit status: 0 when the job passed (or failed with allow_failure), the job's own exit code
when it failed, 124 when it ran out of time, 130 when interrupted, and 125 when exec itself
could not run it (no such job, invalid YAML, an unsupported keyword, a missing image, a system
failure), with a one-line reason on stderr."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nspawn_runner import log, proc, settings, table
from nspawn_runner.errors import CiConfigError, NspawnRunnerError, SystemFailure
from nspawn_runner.executor import identity
from nspawn_runner.executor.prepare import cache_host_dir, gitlab_runner_binary
from nspawn_runner.images import names
from nspawn_runner.local import ci_yaml, sources, transfer
from nspawn_runner.local import runner as rn
from nspawn_runner.local.ci_model import ResolvedJob
from nspawn_runner.local.ci_variables import slugify
from nspawn_runner.progress import Step
from nspawn_runner.settings import Settings

EXIT_TIMEOUT = 124
EXIT_OWN_FAILURE = 125
EXIT_INTERRUPTED = 130
DEFAULT_TIMEOUT = 3600  # GitLab's default project timeout
TRANSFER = ".nspawn-runner-exec"  # in the project's cache directory, bound into the machine
HELPER = Path(__file__).resolve().parent / "gitlab-runner"


@dataclass(frozen=True)
class Options:
    job: str | None = None
    directory: Path = Path(".")
    file: Path | None = None
    variables: tuple[str, ...] = ()
    image: str | None = None
    tracked_only: bool = False
    force: bool = False
    keep: bool = False
    shell_on_failure: bool = False
    artifacts_dir: Path | None = None
    list_jobs: bool = False
    preview: bool = False


@dataclass(frozen=True)
class Project:
    tree: sources.Tree
    predefined: sources.Predefined
    pipeline: ci_yaml.Pipeline
    remote_url: str | None


def _out(text: str) -> None:
    print(text, flush=True)


def load_project(opts: Options) -> Project:
    root = sources.toplevel(opts.directory)
    tree = sources.tree(root, tracked_only=opts.tracked_only)
    if opts.file is not None:
        path = opts.file if opts.file.is_absolute() else Path.cwd() / opts.file
        try:
            text = path.read_text()
        except OSError as e:
            raise CiConfigError(f"cannot read {opts.file}: {e.strerror}") from None
        try:
            config_path = path.resolve().relative_to(root).as_posix()
        except ValueError:
            config_path = path.name
    else:
        config_path = ".gitlab-ci.yml"
        data = tree.read(config_path)
        if data is None:
            raise CiConfigError(f"no .gitlab-ci.yml in {root}"
                                f"{' (committed)' if opts.tracked_only else ''}: pass --file "
                                "PATH, or -C the project's directory")
        text = data.decode("utf-8", "replace")
    predefined = sources.predefined(root, config_path=config_path)
    pipeline = ci_yaml.load(text, files=tree, predefined=predefined.variables,
                            cli=opts.variables, source=config_path)
    url = sources.remote_url(root, predefined.variables.get("CI_COMMIT_BRANCH"))
    return Project(tree, predefined, pipeline,
                   transfer.strip_credentials(url) if url and sources.parse_remote(url) else None)


def list_text(p: ci_yaml.Pipeline) -> str:
    rows = [["JOB", "STAGE", "WHEN", "IN THIS PIPELINE"]]
    for j in ci_yaml.list_jobs(p):
        if j.problems:
            status = "unsupported: " + "; ".join(j.problems)
        else:
            status = "yes" if j.included else f"no ({j.reason})"
        rows.append([j.name, j.stage, j.when, status])
    return table.render(rows)


def _status_line(job: ResolvedJob, result: rn.JobResult, code: int) -> str:
    took = f"{result.duration:.1f} s"
    if result.status == "success":
        return f"Job {job.name} passed in {took}"
    if result.status == "failed" and result.exit_code is not None:
        allowed = " (allowed to fail)" if code == 0 else ""
        return f"Job {job.name} failed with exit code {result.exit_code}{allowed} in {took}"
    if result.status == "timedout":
        allowed = " (allowed to fail)" if code == 0 else ""
        limit = job.timeout or DEFAULT_TIMEOUT
        return f"Job {job.name} timed out after its {limit} s timeout{allowed} ({took})"
    if result.status == "canceled":
        return f"Job {job.name} was cancelled after {took}"
    return f"Job {job.name} could not run: {result.error} ({took})"


def exit_code(job: ResolvedJob, result: rn.JobResult) -> int:
    allow = job.allow_failure
    if result.status == "success":
        return 0
    if result.status == "failed" and result.exit_code is not None:
        return 0 if allow.permits(result.exit_code) else result.exit_code or 1
    if result.status == "timedout":
        return 0 if allow.allowed else EXIT_TIMEOUT
    if result.status == "canceled":
        return EXIT_INTERRUPTED
    return EXIT_OWN_FAILURE


def _runner_expand(text: str, variables: dict[str, str]) -> str:
    return rn.go_expand(text, lambda k: "$" if k == "$" else variables.get(k, ""))


class _Run:
    """One exec of one job: the transfer directory, the runner's job, the results."""

    def __init__(self, cfg: Settings, opts: Options, project: Project, job: ResolvedJob,
                 who: transfer.Caller) -> None:
        self.cfg, self.opts, self.project, self.job, self.who = cfg, opts, project, job, who
        pre = project.predefined.variables
        self.local_root = cfg.root / "local"
        self.job_id = transfer.next_job_id(self.local_root)
        self.server_url = pre.get("CI_SERVER_URL", "https://local")
        self.project_path = pre["CI_PROJECT_PATH"]
        self.image = opts.image if opts.image is not None else (job.image or "")
        variables = {v.key: v.value for v in job.variables}
        self.builds_dir = cfg.builds_dir
        self.project_dir = f"{cfg.builds_dir}/{self.project_path}"
        runner_side = {"CI_PROJECT_DIR": self.project_dir, "CI_BUILDS_DIR": cfg.builds_dir,
                       "CI_JOB_ID": str(self.job_id), "CI_PIPELINE_ID": str(self.job_id)}
        self.expanded = {**variables, **runner_side}
        self.image = _runner_expand(self.image, self.expanded)
        self.ident = identity.Job(str(self.job_id), "", "", self.project_path, self.image)
        self.host_transfer: Path | None = None
        self.inside_transfer = ""
        self.store_dir = self.local_root / "artifacts"

    def runner_job(self) -> rn.Job:
        """The job for the runner, and everything it needs on the host: the transfer
        directory with the sources and the dependencies' artifacts."""
        job, pre = self.job, self.project.predefined.variables
        own = [rn.JobVariable(v.key, v.value, raw=v.raw) for v in job.variables]
        own += [rn.JobVariable("CI_JOB_ID", str(self.job_id)),
                rn.JobVariable("CI_PIPELINE_ID", str(self.job_id)),
                rn.JobVariable("CI_PIPELINE_IID", str(self.job_id))]
        out = rn.Job(
            script=[*job.before_script, *job.script],
            after_script=list(job.after_script) if job.after_script else None,
            job_id=self.job_id, name=job.name, stage=job.stage, project_id=0,
            project_path=self.project_path, image=self.image or None,
            git_strategy=None, ref=pre.get("CI_COMMIT_REF_NAME", ""),
            sha=pre.get("CI_COMMIT_SHA", ""), before_sha=sources.NO_SHA,
            pipeline_id=self.job_id, timeout=job.timeout or DEFAULT_TIMEOUT,
            cache=[rn.CacheSpec(list(c.paths), c.key, False, c.policy, c.when,
                                list(c.fallback_keys)) for c in job.caches],
            artifacts=[rn.ArtifactSpec(list(job.artifacts.paths), job.artifacts.name or "",
                                       job.artifacts.when, job.artifacts.expire_in or "",
                                       exclude=list(job.artifacts.exclude))]
            if job.artifacts else [],
            token=secrets.token_hex(16), server_variables=own)
        self.ident = self._identity(out)
        self.host_transfer = cache_host_dir(self.cfg, self.ident) / TRANSFER / str(self.job_id)
        self.inside_transfer = (f"{self.cfg.cache_dir}/{self.ident.project_path}/{TRANSFER}/"
                                f"{self.job_id}")
        self.store_dir = (self.local_root / "artifacts" / self.ident.server
                          / self.ident.project_path)
        self.host_transfer.mkdir(parents=True, exist_ok=True)
        os.chmod(self.host_transfer, 0o700)
        strategy = self.expanded.get("GIT_STRATEGY", "fetch")
        depth_text = self.expanded.get("GIT_DEPTH", "20")
        if strategy not in ("none", "empty"):
            with Step("copy the project as git sees it"):
                transfer.source_archive(self.project.tree, pre,
                                        int(depth_text) if depth_text.isdigit() else 20,
                                        self.host_transfer, self.host_transfer / "source.tar",
                                        self.project.remote_url)
            out.local_sources = f"{self.inside_transfer}/source.tar"
        for name in job.dependencies:
            stored = self.store_dir / f"{slugify(name) or 'job'}.artifacts"
            if stored.is_file():
                copy = self.host_transfer / f"dependency-{len(out.dependency_archives)}"
                shutil.copyfile(stored, copy)
                out.dependency_archives.append((name, f"{self.inside_transfer}/{copy.name}"))
        if job.artifacts:
            out.local_artifacts = f"{self.inside_transfer}/artifacts"
        return out

    def _identity(self, job: rn.Job) -> identity.Job:
        """The machine, cache and project the driver will derive from this job: computed by
        the driver's own code from the same response file."""
        with tempfile.TemporaryDirectory(prefix="nspawn-runner-exec-") as tmp:
            path = Path(tmp) / "response.json"
            path.write_text(rn.go_json_dumps(rn.job_payload(self.runner_config(), job)))
            return identity.load({"JOB_RESPONSE_FILE": str(path),
                                  "CUSTOM_ENV_CI_JOB_IMAGE": self.image})

    def runner_config(self) -> rn.RunnerConfig:
        me = [sys.executable, "-m", "nspawn_runner"]
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        if not self.cfg.gitlab_runner and gitlab_runner_binary(self.cfg) is None:
            # Caches need a gitlab-runner helper in the machine; a developer's machine rarely
            # has one, so lend the stand-in (prepare finds it on PATH and binds it).
            bin_dir = self.local_root / "bin"
            bin_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HELPER, bin_dir / "gitlab-runner")
            os.chmod(bin_dir / "gitlab-runner", 0o755)
            env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
        return rn.RunnerConfig(
            run_exec=[*me, "run"], config_exec=[*me, "config"], prepare_exec=[*me, "prepare"],
            cleanup_exec=[*me, "cleanup"], name="nspawn-runner exec",
            short_token="local", system_id="local", server_url=self.server_url,
            # Shorter than gitlab-runner's 10 minutes: the driver ends a cancelled step in
            # seconds, and a person is waiting.
            graceful_kill_timeout=30, retry_delay=1, process_env=env,
            skip_cleanup=self.opts.keep)

    def collect_artifacts(self) -> None:
        if self.host_transfer is None:
            return
        archive = self.host_transfer / "artifacts"
        if not self.job.artifacts or not archive.is_file():
            return
        excludes = [_runner_expand(e, self.expanded).removeprefix(self.project_dir + "/")
                    for e in self.job.artifacts.exclude]
        data, kept = transfer.filter_artifacts(archive, excludes)
        dest = self.opts.artifacts_dir or self.project.tree.root
        transfer.extract_as(self.who, data, dest.resolve())
        transfer.store(transfer.as_format_of(archive, data),
                       self.store_dir / f"{slugify(self.job.name) or 'job'}.artifacts")
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        _out(f"Artifacts: {len(kept)} file(s) into {dest}"
             f"{' (owned by ' + self.who.name + ')' if not self.who.is_root else ''}"
             f"{': ' + shown if kept else ''}")

    def remove_transfer(self) -> None:
        if self.host_transfer is not None:
            shutil.rmtree(self.host_transfer, ignore_errors=True)


def _shell_in(machine: str, project_dir: str, variables: dict[str, str]) -> None:
    """--shell-on-failure: an interactive shell in the job's machine, as the job's user, in
    its project directory, with its variables (a login session through machined, so the
    shell has a real terminal with job control)."""
    from nspawn_runner.executor import state

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        log.warn("--shell-on-failure needs a terminal; going on without a shell")
        return
    saved = state.read(machine)
    user = saved.user if saved else "root"
    _out(f"\n--- step failed: a shell in machine {machine} as {user}, in {project_dir}, with "
         "the job's variables; exit it to go on (after_script, cache, artifacts, cleanup) ---")
    argv = ["machinectl", "shell", "--quiet",
            *[f"--setenv={k}={v}" for k, v in variables.items()
              if k.isidentifier() and "\n" not in v],
            f"{user}@{machine}", "/bin/bash", "-c",
            f"cd {shlex.quote(project_dir)} && exec /bin/bash -i"]
    proc.spawn(argv).wait()
    _out("--- shell ended; the job goes on ---")


def run(opts: Options) -> int:
    """The whole command; returns the exit status (errors of exec itself: 125, reported)."""
    try:
        return _run(opts)
    except NspawnRunnerError as e:
        log.error(str(e))
        return EXIT_OWN_FAILURE


def _run(opts: Options) -> int:
    project = load_project(opts)
    p = project.pipeline
    if opts.list_jobs:
        _out(list_text(p).rstrip("\n"))
        return 0
    if not opts.job:
        raise CiConfigError(f"name a job to run; the jobs of {p.source}: "
                            + ", ".join(p.instances) + " (--list shows more)")
    job = ci_yaml.resolve_job(p, opts.job)
    if opts.preview:
        _out(ci_yaml.preview(job).rstrip("\n"))
        return 0
    if not job.included and not opts.force:
        raise CiConfigError(f"job {job.name!r} would not run in this pipeline ("
                            f"{job.rules_reason}); add --force to run it anyway")
    if os.geteuid() != 0:
        raise SystemFailure("exec boots a machine, which needs root: run it with sudo")
    cfg = settings.load()
    who = transfer.caller()
    r = _Run(cfg, opts, project, job, who)
    names.resolve(cfg, r.image, "")  # a missing image: say so now, not after three boots
    for note in (*p.notes, *project.predefined.notes, *job.notes):
        log.info(f"note: {note}")
    if not job.included:
        log.info(f"note: running {job.name} although {job.rules_reason} (--force)")
    try:
        runner_job = r.runner_job()
        return _execute(r, runner_job)
    finally:
        r.remove_transfer()


def _execute(r: _Run, runner_job: rn.Job) -> int:
    plain = not sys.stdout.isatty()

    def show(line: str) -> None:
        print(rn.strip_ansi(line) if plain else line, flush=True)

    failure_hook: Callable[[str, dict[str, str]], None] | None = None
    interactive = threading.Event()
    if r.opts.shell_on_failure:
        def failure_hook(project_dir: str, variables: dict[str, str]) -> None:
            interactive.set()
            try:
                _shell_in(r.ident.machine, project_dir, variables)
            finally:
                interactive.clear()

    handle = rn.JobRun(r.runner_config(), runner_job, live_output=show,
                       on_script_failure=failure_hook)
    interrupted: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if interactive.is_set():
            return  # the shell's terminal gets the keys, not us
        interrupted.append(signum)
        if len(interrupted) == 1:
            log.info("\nexec: cancelling the job (after_script and cleanup still run; "
                     "again to stop at once)")
            handle.cancel()
        else:
            handle.abort()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        handle.start()
        while True:
            try:
                result = handle.wait(0.2)
                break
            except TimeoutError:
                continue
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    r.collect_artifacts()
    code = exit_code(r.job, result)
    if interrupted and result.status != "success":
        code = EXIT_INTERRUPTED
    if r.opts.keep:
        _out(f"Machine {r.ident.machine} is still running (--keep). Enter it with: sudo "
             f"machinectl shell {r.ident.machine} /bin/bash -c 'cd {r.project_dir} && exec "
             "bash -l'\nRemove it with: sudo nspawn-runner gc --grace 0")
    _out(_status_line(r.job, result, code))
    return code
