"""The job as the GitLab API hands it to the runner (response.json) and its variables."""

from __future__ import annotations

import posixpath
import re
from urllib.parse import urlsplit

from nspawn_runner.local.runner.gocompat import go_path_join, go_quote
from nspawn_runner.local.runner.model import Job, JobVariable, RunnerConfig


def _slug(text: str) -> str:
    """GitLab's CI_*_SLUG: lower-case, non-alphanumerics to '-', at most 63 characters."""
    slug = re.sub(r"[^a-z0-9]", "-", text.lower())[:63]
    return slug.strip("-")


def _server_url_parts(server_url: str) -> tuple[str, str, str]:
    parts = urlsplit(server_url)
    scheme = parts.scheme or "https"
    host = parts.hostname or "gitlab.example.com"
    port = str(parts.port or (443 if scheme == "https" else 80))
    return scheme, host, port


def repo_url(config: RunnerConfig, job: Job) -> str:
    """The repository URL GitLab hands out (with the job token in it)."""
    scheme, _, _ = _server_url_parts(config.server_url)
    netloc = urlsplit(config.server_url).netloc or "gitlab.example.com"
    base_path = urlsplit(config.server_url).path.rstrip("/")
    return f"{scheme}://gitlab-ci-token:{job.token}@{netloc}{base_path}/{job.project_path}.git"


def _server_variables(config: RunnerConfig, job: Job) -> list[JobVariable]:
    """The job's own variables (the ``variables`` of the API payload)."""
    scheme, host, port = _server_url_parts(config.server_url)
    server = config.server_url.rstrip("/")
    namespace, _, project_name = job.project_path.rpartition("/")
    project_url = f"{server}/{job.project_path}"
    predefined: list[tuple[str, str, bool, bool]] = [  # key, value, public, masked
        ("CI_PIPELINE_ID", str(job.pipeline_id), True, False),
        ("CI_PIPELINE_URL", f"{project_url}/-/pipelines/{job.pipeline_id}", True, False),
        ("CI_PIPELINE_SOURCE", "push", True, False),
        ("CI_JOB_ID", str(job.job_id), True, False),
        ("CI_JOB_URL", f"{project_url}/-/jobs/{job.job_id}", True, False),
        ("CI_JOB_TOKEN", job.token, False, True),
        ("CI_JOB_NAME", job.name, True, False),
        ("CI_JOB_NAME_SLUG", _slug(job.name), True, False),
        ("CI_JOB_STAGE", job.stage, True, False),
        ("CI_REGISTRY_USER", "gitlab-ci-token", True, False),
        ("CI_REGISTRY_PASSWORD", job.token, False, True),
        ("CI_REPOSITORY_URL", repo_url(config, job), False, False),
        ("CI_COMMIT_SHA", job.sha, True, False),
        ("CI_COMMIT_SHORT_SHA", job.sha[:8], True, False),
        ("CI_COMMIT_BEFORE_SHA", job.before_sha, True, False),
        ("CI_COMMIT_REF_NAME", job.ref, True, False),
        ("CI_COMMIT_REF_SLUG", _slug(job.ref), True, False),
        ("CI_COMMIT_BRANCH", job.ref, True, False),
        ("CI_COMMIT_REF_PROTECTED", "false", True, False),
        ("CI_DEFAULT_BRANCH", "main", True, False),
        ("CI_PROJECT_ID", str(job.project_id), True, False),
        ("CI_PROJECT_NAME", project_name, True, False),
        ("CI_PROJECT_TITLE", project_name, True, False),
        ("CI_PROJECT_PATH", job.project_path, True, False),
        ("CI_PROJECT_PATH_SLUG", _slug(job.project_path), True, False),
        ("CI_PROJECT_NAMESPACE", namespace, True, False),
        ("CI_PROJECT_ROOT_NAMESPACE", namespace.split("/")[0], True, False),
        ("CI_PROJECT_URL", project_url, True, False),
        ("CI_PROJECT_VISIBILITY", "private", True, False),
        ("CI_SERVER_URL", server, True, False),
        ("CI_SERVER_HOST", host, True, False),
        ("CI_SERVER_PORT", port, True, False),
        ("CI_SERVER_PROTOCOL", scheme, True, False),
        ("CI_SERVER_NAME", "GitLab", True, False),
        ("CI_SERVER_VERSION", "18.6.0", True, False),
        ("CI_API_V4_URL", f"{server}/api/v4", True, False),
        ("CI_RUNNER_ID", str(config.runner_id), True, False),
        ("CI_RUNNER_DESCRIPTION", config.name, True, False),
        ("CI_RUNNER_TAGS", '["nspawn"]', True, False),
        ("GITLAB_USER_ID", "1", True, False),
        ("GITLAB_USER_LOGIN", "tester", True, False),
        ("GITLAB_CI", "true", True, False),
        ("CI", "true", True, False),
        ("CI_NODE_TOTAL", "1", True, False),
        ("CI_CONFIG_PATH", ".gitlab-ci.yml", True, False),
    ]
    out = ([JobVariable(k, v, public=p, masked=m) for k, v, p, m in predefined]
           if job.server_variables is None else list(job.server_variables))
    if job.git_strategy is not None:
        out.append(JobVariable("GIT_STRATEGY", job.git_strategy))
    if job.script_timeout is not None:
        out.append(JobVariable("RUNNER_SCRIPT_TIMEOUT", job.script_timeout))
    if job.after_script_timeout is not None:
        out.append(JobVariable("RUNNER_AFTER_SCRIPT_TIMEOUT", job.after_script_timeout))
    for key, value in job.variables.items():
        out.append(JobVariable(key, value, masked=key in job.masked_variables,
                               raw=key in job.raw_variables))
    for key, value in job.file_variables.items():
        out.append(JobVariable(key, value, masked=key in job.masked_variables,
                               raw=key in job.raw_variables, file=True))
    out.extend(job.extra_variables)
    return out


def _job_steps(job: Job) -> list[dict[str, object]]:
    steps: list[dict[str, object]] = [{"name": "script", "script": list(job.script),
                                       "timeout": job.timeout, "when": "on_success",
                                       "allow_failure": False}]
    for name, lines in job.extra_steps.items():
        steps.append({"name": name, "script": list(lines), "timeout": job.timeout,
                      "when": "on_success", "allow_failure": False})
    if job.after_script is not None:
        steps.append({"name": "after_script", "script": list(job.after_script),
                      "timeout": job.timeout, "when": "always", "allow_failure": True})
    return steps


def job_payload(config: RunnerConfig, job: Job) -> dict[str, object]:
    """The job as the GitLab API hands it out (what ``response.json`` holds)."""
    _, _, project_name = job.project_path.rpartition("/")
    return {
        "id": job.job_id,
        "token": job.token,
        "allow_git_fetch": True,
        "job_info": {"name": job.name, "stage": job.stage, "project_id": job.project_id,
                     "project_name": project_name, "project_full_path": job.project_path,
                     "time_in_queue_seconds": 0.5},
        "git_info": {"repo_url": repo_url(config, job), "repo_object_format": "sha1",
                     "ref": job.ref, "sha": job.sha, "before_sha": job.before_sha,
                     "ref_type": "branch",
                     "refspecs": [f"+refs/pipelines/{job.pipeline_id}:refs/pipelines/"
                                  f"{job.pipeline_id}",
                                  f"+refs/heads/{job.ref}:refs/remotes/origin/{job.ref}"],
                     "depth": job.git_depth, "protected": False},
        "runner_info": {"timeout": job.timeout, "runner_session_url": ""},
        "variables": [v.to_json() for v in _server_variables(config, job)],
        "steps": _job_steps(job),
        "image": {"name": job.image or "", "alias": "", "command": None, "entrypoint": None,
                  "ports": None, "variables": None, "pull_policy": None},
        "services": [{"name": s.name, "alias": s.alias, "command": s.command,
                      "entrypoint": s.entrypoint} for s in job.services],
        "artifacts": [{"name": a.name, "untracked": a.untracked, "paths": a.paths,
                       "exclude": a.exclude, "when": a.when, "artifact_type": a.artifact_type,
                       "artifact_format": a.artifact_format, "expire_in": a.expire_in}
                      for a in job.artifacts] or None,
        "cache": [{"key": c.key, "untracked": c.untracked, "policy": c.policy,
                   "paths": c.paths, "when": c.when, "fallback_keys": c.fallback_keys}
                  for c in job.cache],
        "credentials": [],
        "dependencies": [],
        "features": {"trace_sections": True, "token_mask_prefixes": [],
                     "failure_reasons": ["unknown_failure", "script_failure",
                                         "runner_system_failure", "job_execution_timeout"]},
        "secrets": None,
        "hooks": None,
    }


def _sanitize_cache_key(key: str) -> tuple[str, str]:
    """shells.sanitizeCacheKey: (key, warning)."""
    if key == "":
        return "", ""
    fixed = key.replace("%2e", ".").replace("%2E", ".").replace("%2f", "/").replace("%2F", "/")
    cleaned = go_path_join("/", fixed.replace("\\", "/"))
    result = ""
    while cleaned:
        directory, base = posixpath.split(cleaned)
        base = base.rstrip()
        if base == "":
            cleaned = directory[:-1] if directory.endswith("/") else ""
            continue
        result = go_path_join(directory[1:], base)
        break
    if result == "":
        return "", f"cache key {go_quote(key)} could not be sanitized"
    if result != key:
        return result, f"cache key {go_quote(key)} sanitized to {go_quote(result)}"
    return result, ""
