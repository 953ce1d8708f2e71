"""The script of each stage, as gitlab-runner writes it (shells/abstract.go)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

from nspawn_runner.local.runner.bash import _BashWriter
from nspawn_runner.local.runner.gocompat import go_path_join, go_quote, shell_escape
from nspawn_runner.local.runner.model import (
    RUNNER_ARCH,
    RUNNER_VERSION,
    CacheSpec,
    CallRecord,
    JobVariable,
)
from nspawn_runner.local.runner.payload import _sanitize_cache_key, repo_url
from nspawn_runner.local.runner.process import _Err
from nspawn_runner.local.runner.state import _BuildState


@contextlib.contextmanager
def _with_helper(w: _BashWriter, what: str) -> Iterator[None]:
    """The commands written inside run only where the job's image has gitlab-runner; elsewhere
    the script warns that `what` is disabled (as gitlab-runner's generated scripts do)."""
    w.if_cmd("gitlab-runner", "--version")
    yield
    w.else_()
    w.warning(f"Missing gitlab-runner. {what} is disabled.")
    w.end_if()


def _wanted(when: str | None, on_success: bool) -> bool:
    """Whether a cache or artifact with `when:` is saved after a job that succeeded
    (`on_success`) or failed."""
    when = when or "on_success"
    return when == "always" or (when == "on_success") == on_success


class _BuildScripts(_BuildState):
    """Bookkeeping and the stage scripts."""

    # -- bookkeeping -------------------------------------------------------------------

    def add_call(self, record: CallRecord) -> None:
        with self._calls_lock:
            self.calls.append(record)

    def stage_started(self, stage: str) -> None:
        self.run_handle._stage_started(stage)

    # -- scripts (shells/abstract.go) -----------------------------------------------------

    def writer(self) -> _BashWriter:
        return _BashWriter(self.tmp_project_dir, self.shell,
                           self.ff("FF_SET_PERMISSIONS_BEFORE_CLEANUP"))

    def _write_exports(self, w: _BashWriter) -> None:
        for var in self.all_variables():
            w.variable(var)
        env_file = w.tmp_file("gitlab_runner_env")
        w.variable(JobVariable("GITLAB_ENV", env_file))
        w.source_env(env_file)

    def _write_commands(self, w: _BashWriter, commands: Iterable[str]) -> None:
        for raw in commands:
            command = raw.strip()
            if command == "":
                w.empty_line()
            elif "\n" in command:
                w.notice(f"$ {command.split(chr(10), 1)[0]} # collapsed multi-line command")
            else:
                w.notice(f"$ {command}")
            w.line(command)

    def _change_files_ownership(self, w: _BashWriter, *dirs: str) -> None:
        uid_gid_file = f"{self.root_dir}/.gitlab-build-uid-gid"
        w.if_file(uid_gid_file)
        for d in dirs:
            if not d.strip():
                continue
            w.if_directory(d)
            w.line(f"chown -R \"$(stat -c '%u:%g' '{uid_gid_file}')\" '{d}'")
            w.end_if()
        w.end_if()

    def _remote_urls(self) -> tuple[str, str]:
        with_creds = repo_url(self.config, self.job)
        parts = urlsplit(with_creds)
        netloc = parts.netloc.rpartition("@")[2]
        return with_creds, parts._replace(netloc=netloc).geturl()

    def _write_git_cleanup(self, w: _BashWriter) -> None:
        git_dir = go_path_join(self.build_dir, ".git")
        for name in ("index.lock", "shallow.lock", "HEAD.lock", "hooks/post-checkout",
                     "config.lock"):
            w.rm_file(go_path_join(git_dir, name))
        w.rm_files_recursive(go_path_join(git_dir, "refs"), "*.lock")
        if self.settings.git_strategy != "none":
            for d in (w.tmp_file("git-template"), git_dir):
                w.rm_file(go_path_join(d, "config"))
                w.rm_dir(go_path_join(d, "hooks"))

    def _write_git_fetch(self, w: _BashWriter, clone: bool) -> None:
        """Fetch/clone as the runner writes it (a real git server is needed to succeed)."""
        project_dir = self.build_dir
        self._write_git_cleanup(w)
        template_dir = w.mk_tmp_dir("git-template")
        template_file = go_path_join(template_dir, "config")
        ext_config = w.tmp_file(".gitlab-runner.ext.conf")
        for key, value in (("init.defaultBranch", "none"), ("fetch.recurseSubmodules", "false"),
                           ("credential.interactive", "never"), ("gc.autoDetach", "false")):
            w.command("git", "config", "-f", template_file, key, value)
        w.rm_file(ext_config)
        if self.ff("FF_USE_GIT_BUNDLE_URIS"):
            w.command_arg_expand("git", "config", "-f", ext_config, "transfer.bundleURI", "true")
        with_creds, without_creds = self._remote_urls()
        w.command_arg_expand("git", "config", "--file", ext_config, "--replace-all",
                             f"url.{with_creds}.insteadOf", without_creds,
                             "^" + re.escape(without_creds) + "$")
        w.command_arg_expand("git", "config", "--file", template_file, "--replace-all",
                             "include.path", ext_config, r"\.gitlab-runner\.ext\.conf$")
        w.line(f"export GLR_EXT_GIT_CONFIG_PATH={shell_escape(ext_config)}")
        if clone:
            w.rm_dir(project_dir)
        depth = self.job.git_depth
        w.notice(f"Fetching changes with git depth set to {depth}..." if depth > 0
                 else "Fetching changes...")
        w.command("git", "init", project_dir, "--template", template_dir)
        w.cd(project_dir)
        w.if_cmd("git", "remote", "add", "origin", without_creds)
        w.notice("Created fresh repository.")
        w.else_()
        w.command("git", "remote", "set-url", "origin", without_creds)
        w.command_arg_expand("git", "config", "--file", ".git/config", "--replace-all",
                             "include.path", "$GLR_EXT_GIT_CONFIG_PATH",
                             r"\.gitlab-runner\.ext\.conf$")
        w.end_if()
        fetch = ["-c", f"http.userAgent=gitlab-runner {RUNNER_VERSION} linux/{RUNNER_ARCH}",
                 "fetch", "origin", "--no-recurse-submodules",
                 f"+refs/pipelines/{self.job.pipeline_id}:refs/pipelines/{self.job.pipeline_id}",
                 f"+refs/heads/{self.job.ref}:refs/remotes/origin/{self.job.ref}"]
        if depth > 0:
            fetch += ["--depth", str(depth)]
        fetch += self.settings.fetch_flags
        if depth > 0:
            w.command("git", *fetch)
        else:
            w.if_file(".git/shallow")
            w.command("git", *fetch, "--unshallow")
            w.else_()
            w.command("git", *fetch)
            w.end_if()

    def _script_get_sources(self, w: _BashWriter) -> bool:
        strategy = self.settings.git_strategy
        self._write_exports(w)
        w.variable(JobVariable("GIT_TERMINAL_PROMPT", "0"))
        w.variable(JobVariable("GCM_INTERACTIVE", "Never"))
        if strategy not in ("none", "empty") and self.config.pre_get_sources_script:
            self._write_commands(w, [self.config.pre_get_sources_script])
        if not self.settings.lfs_skip_smudge:
            w.variable(JobVariable("GIT_LFS_SKIP_SMUDGE", "1"))
        if self.job.local_sources is not None and strategy not in ("none", "empty"):
            # exec: the developer's working tree (a shallow clone of HEAD with the working
            # tree's changes on top), in place of a fetch from the GitLab server.
            w.notice("Copying the local working tree (a clone of HEAD with the working "
                     "tree's changes)...")
            w.rm_dir(self.build_dir)
            w.mkdir(self.build_dir)
            w.command("tar", "-x", "-f", self.job.local_sources, "-C", self.build_dir)
        elif strategy in ("fetch", "clone"):
            self._write_git_fetch(w, clone=strategy == "clone")
        elif strategy == "none":
            w.notice("Skipping Git repository setup")
            w.mkdir(self.build_dir)
        else:
            w.notice("Skipping Git repository setup and creating an empty build directory")
            w.rm_dir(self.build_dir)
            w.mkdir(self.build_dir)
        if strategy in ("fetch", "clone") and self.settings.git_checkout and \
                self.job.local_sources is None:
            w.notice(f"Checking out {self.job.sha[:8]} as detached HEAD "
                     f"(ref is {self.job.ref})...")
            w.command("git", "-c", "submodule.recurse=false", "checkout", "-f", "-q",
                      self.job.sha)
            if self.settings.clean_flags:
                w.command("git", "clean", *self.settings.clean_flags)
            if not self.settings.lfs_skip_smudge:
                w.if_cmd("git", "lfs", "version")
                w.command("git", "lfs", "pull")
                w.empty_line()
                w.end_if()
        else:
            w.notice("Skipping Git checkout")
        w.notice("Skipping Git submodules setup")
        if strategy not in ("none", "empty") and self.config.post_get_sources_script:
            self._write_commands(w, [self.config.post_get_sources_script])
        self._change_files_ownership(w, self.root_dir)
        return False

    def _script_clear_worktree(self, w: _BashWriter) -> bool:
        w.notice("Deleting tracked and untracked files...")
        w.if_directory(self.build_dir)
        w.cd(self.build_dir)
        w.command("git", "rm", "-rf", "--ignore-unmatch", ".")
        w.command("git", "clean", "-ffdx")
        w.end_if()
        return False

    def _cache_file(self, key: str, w: _BashWriter) -> tuple[str, str] | None:
        """(human key, archive path relative to the project dir), or None to skip."""
        raw_key = self.expand(key) if key else go_path_join(self.job.name, self.job.ref)
        human, warning = _sanitize_cache_key(raw_key)
        if warning:
            w.warning(warning)
        if human == "":
            w.notice("Skipping cache extraction due to empty cache key")
            return None
        archive = go_path_join(self.cache_dir, human, "cache.zip")
        if os.path.isabs(archive) != os.path.isabs(self.build_dir):
            w.notice("Skipping cache due to inability to make the cache file path relative "
                     "to the build directory (is the build directory absolute?)")
            return None
        return human, os.path.relpath(archive, self.build_dir)

    def _check_policy(self, spec: CacheSpec, want: str, key: str) -> bool:
        policy = self.expand(spec.policy)
        if policy in ("", "pull-push"):
            return True
        if policy in ("pull", "push"):
            return policy == want
        raise _Err(f"unknown cache policy {policy} for {key}")

    def _write_extract(self, w: _BashWriter, keys: list[tuple[str, str]]) -> None:
        human, archive = keys[0]
        w.notice(f"Checking cache for {human}...")
        w.if_cmd_with_output("gitlab-runner", "cache-extractor", "--file", archive,
                             "--timeout", str(self.settings.cache_request_timeout))
        w.notice("Successfully extracted cache")
        w.else_()
        w.warning("Failed to extract cache")
        if len(keys) > 1:
            self._write_extract(w, keys[1:])
        w.end_if()

    def _script_restore_cache(self, w: _BashWriter) -> bool:
        self._write_exports(w)
        w.cd(self.build_dir)
        skip = True
        for spec in self.job.cache:
            if not spec.paths and not spec.untracked:
                continue
            skip = False
            found = self._cache_file(spec.key, w)
            if found is None:
                continue
            if not self._check_policy(spec, "pull", found[0]):
                w.notice(f"Not downloading cache {found[0]} due to policy")
                continue
            keys = [found]
            for fallback in [*spec.fallback_keys, self.value("CACHE_FALLBACK_KEY")]:
                if not fallback:
                    continue
                if fallback.endswith("-protected") and fallback == self.value(
                        "CACHE_FALLBACK_KEY"):
                    w.warning(f"CACHE_FALLBACK_KEY {go_quote(fallback)} not allowed to end in "
                              f"{go_quote('-protected')}")
                    continue
                extra = self._cache_file(self.expand(fallback), w)
                if extra is not None:
                    keys.append(extra)
            with _with_helper(w, "Extracting cache"):
                self._write_extract(w, keys)
        if skip:
            return True
        self._change_files_ownership(w, self.cache_dir, self.root_dir)
        return False

    def _script_archive_cache(self, w: _BashWriter, on_success: bool) -> bool:
        self._write_exports(w)
        w.cd(self.build_dir)
        skip = True
        for spec in self.job.cache:
            if not _wanted(spec.when, on_success):
                continue
            args: list[str] = []
            for p in spec.paths:
                args += ["--path", p]
            if spec.untracked:
                args.append("--untracked")
            if not args:
                continue
            skip = False
            found = self._cache_file(spec.key, w)
            if found is None:
                continue
            if not self._check_policy(spec, "push", found[0]):
                w.notice(f"Not uploading cache {found[0]} due to policy")
                continue
            with _with_helper(w, "Creating cache"):
                w.notice(f"Creating cache {found[0]}...")
                w.if_cmd_with_output("gitlab-runner", "cache-archiver", "--file", found[1],
                                     "--timeout", str(self.settings.cache_request_timeout), *args)
                w.notice("Created cache")
                w.else_()
                w.warning("Failed to create cache")
                w.end_if()
        return skip

    def _script_upload_artifacts(self, w: _BashWriter, on_success: bool) -> bool:
        if self.job.local_artifacts is not None:
            return self._script_local_artifacts(w, on_success, self.job.local_artifacts)
        if not self.config.server_url:
            return True
        self._write_exports(w)
        w.cd(self.build_dir)
        skip = True
        for art in self.job.artifacts:
            if not _wanted(art.when, on_success):
                continue
            paths: list[str] = []
            for p in art.paths:
                paths += ["--path", p]
            for p in art.exclude:
                paths += ["--exclude", p]
            if art.untracked:
                paths.append("--untracked")
            if not paths:
                continue
            skip = False
            args = ["artifacts-uploader", "--url", self.config.server_url, "--token",
                    self.job.token, "--id", str(self.job.job_id), *paths]
            if art.name:
                args += ["--name", art.name]
            if art.expire_in:
                args += ["--expire-in", art.expire_in]
            if art.artifact_format:
                args += ["--artifact-format", art.artifact_format]
            if art.artifact_type:
                args += ["--artifact-type", art.artifact_type]
            with _with_helper(w, "Uploading artifacts"):
                w.notice("Uploading artifacts...")
                w.command("gitlab-runner", *args)
        return skip

    def _script_download_artifacts(self, w: _BashWriter) -> bool:
        """The dependencies' artifacts (exec: archives of earlier local runs)."""
        self._write_exports(w)
        w.cd(self.build_dir)
        for name, archive in self.job.dependency_archives:
            w.notice(f"Downloading artifacts for {name} (from its last local run)...")
            with _with_helper(w, "Extracting artifacts"):
                w.command("gitlab-runner", "cache-extractor", "--file", archive)
        return not self.job.dependency_archives

    def _script_local_artifacts(self, w: _BashWriter, on_success: bool, archive: str) -> bool:
        """exec: the artifacts into one archive that exec takes back to the working tree."""
        self._write_exports(w)
        w.cd(self.build_dir)
        skip = True
        for art in self.job.artifacts:
            if not _wanted(art.when, on_success):
                continue
            paths: list[str] = []
            for p in art.paths:
                paths += ["--path", self.expand(p)]
            if not paths:
                continue
            skip = False
            with _with_helper(w, "Collecting artifacts"):
                w.notice("Collecting artifacts for the local working tree...")
                w.command("gitlab-runner", "cache-archiver", "--file", archive, *paths)
        return skip

    def _script_user(self, w: _BashWriter, stage: str) -> bool:
        steps = {f"step_{name.lower()}": lines for name, lines in
                 [("script", self.job.script), *self.job.extra_steps.items()]}
        if stage not in steps:
            return True
        self._write_exports(w)
        w.cd(self.build_dir)
        if self.config.pre_build_script:
            self._write_commands(w, [self.config.pre_build_script])
        self._write_commands(w, steps[stage])
        if self.config.post_build_script:
            self._write_commands(w, [self.config.post_build_script])
        return False

    def _script_after(self, w: _BashWriter) -> bool:
        if not self.job.after_script:
            return True
        self._write_exports(w)
        w.cd(self.build_dir)
        w.notice("Running after script...")
        self._write_commands(w, self.job.after_script)
        return False

    def _script_cleanup(self, w: _BashWriter) -> bool:
        w.rm_file(w.tmp_file("gitlab_runner_env"))
        w.rm_file(w.tmp_file("masking.db"))
        w.rm_file(w.tmp_file(".gitlab-runner.ext.conf"))
        for var in self.all_variables():
            if var.file:
                w.rm_file(w.tmp_file(var.key))
        self._write_git_cleanup(w)
        w.rm_file(go_path_join(self.root_dir, ".gitlab-build-uid-gid"))
        return False

    def generate(self, stage: str) -> tuple[str, bool]:
        """The script for a stage and whether the stage has nothing to do (ErrSkipBuildStage).
        """
        w = self.writer()
        if stage == "prepare_script":
            if self.hostname:
                w.line("echo " + go_quote(f"Running on $(hostname) via {self.hostname}..."))
            else:
                w.line("echo " + go_quote("Running on $(hostname)..."))
            w.rm_file(w.tmp_file("gitlab_runner_env"))
            w.rm_file(w.tmp_file("masking.db"))
            skip = False
        elif stage == "get_sources":
            skip = self._script_get_sources(w)
        elif stage == "clear_worktree":
            skip = self._script_clear_worktree(w)
        elif stage == "restore_cache":
            skip = self._script_restore_cache(w)
        elif stage == "download_artifacts":
            skip = self._script_download_artifacts(w)
        elif stage == "after_script":
            skip = self._script_after(w)
        elif stage in ("archive_cache", "archive_cache_on_failure"):
            skip = self._script_archive_cache(w, stage == "archive_cache")
        elif stage in ("upload_artifacts_on_success", "upload_artifacts_on_failure"):
            skip = self._script_upload_artifacts(w, stage == "upload_artifacts_on_success")
        elif stage == "cleanup_file_variables":
            skip = self._script_cleanup(w)
        else:
            skip = self._script_user(w, stage)
        return w.finish(self.settings.debug_trace), skip
