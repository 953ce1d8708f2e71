"""Who the current job is, from what gitlab-runner hands every stage call.

The job response file (JOB_RESPONSE_FILE, written by gitlab-runner, mode 0600) is trusted; job
variables (CUSTOM_ENV_*) can be set by the job's author, so nothing that names a machine, a
unit or a host path is taken from them when the response file is there. Imported on the `run`
hot path: stdlib only."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from nspawn_runner import log
from nspawn_runner.errors import SystemFailure

# Unit and machine names share this prefix; `gc` and the tests recognise ours by it.
UNIT_PREFIX = "nspawn-runner-"
MACHINE_PREFIX = "nr-"
_PATH_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_MACHINE_NAME = re.compile(r"^nr-[0-9]{1,20}-[0-9a-f]{8}$")
# Predefined variables whose values are credentials.
_SECRET_VARIABLES = ("CI_JOB_TOKEN", "CI_BUILD_TOKEN", "CI_REGISTRY_PASSWORD",
                     "CI_DEPENDENCY_PROXY_PASSWORD", "CI_JOB_JWT", "CI_JOB_JWT_V2")


@dataclass(frozen=True)
class Job:
    job_id: str
    server: str  # host[:port] of the GitLab instance
    runner_id: str
    project_path: str  # group/project, as gitlab-runner lays out builds and caches
    image_ref: str  # CI_JOB_IMAGE, "" when the job names none

    @property
    def machine(self) -> str:
        """Unique per job on one host, even with several runners or GitLab instances: the job
        id is unique within one instance, and the instance and runner go into the hash."""
        digest = hashlib.sha256(f"{self.server}\0{self.runner_id}".encode()).hexdigest()[:8]
        return f"{MACHINE_PREFIX}{self.job_id}-{digest}"

    @property
    def unit(self) -> str:
        return f"{UNIT_PREFIX}{self.machine}.service"


def is_machine_name(name: str) -> bool:
    return bool(_MACHINE_NAME.match(name))


def _variables(response: Mapping[str, object]) -> dict[str, str]:
    """The first value of each job variable: predefined ones come before the user's."""
    out: dict[str, str] = {}
    raw = response.get("variables")
    for var in raw if isinstance(raw, list) else []:
        if isinstance(var, dict) and isinstance(var.get("key"), str):
            out.setdefault(var["key"], str(var.get("value", "")))
    return out


def project_path_from_url(url: str) -> str | None:
    """`https://host/group/sub/project.git` -> `group/sub/project`, as gitlab-runner does."""
    try:
        path = urlsplit(url).path
    except ValueError:
        return None
    path = path.strip("/").removesuffix(".git")
    parts = path.split("/")
    if not path or not all(_PATH_COMPONENT.match(p) and p not in (".", "..") for p in parts):
        return None
    return path


def _server(url: str) -> str:
    try:
        return urlsplit(url).netloc.rpartition("@")[2]
    except ValueError:
        return ""


def load(environ: Mapping[str, str] | None = None, secret_names: tuple[str, ...] = ()) -> Job:
    """`secret_names`: the settings' extra secret variables, masked like the predefined ones."""
    env = os.environ if environ is None else environ
    response: dict[str, object] = {}
    path = env.get("JOB_RESPONSE_FILE")
    if path:
        try:
            with open(path, "rb") as f:
                loaded = json.load(f)
            response = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError) as e:
            raise SystemFailure(f"cannot read the job response file {path}: {e}") from None
    variables = _variables(response)
    register_secrets(env, response, variables, secret_names)

    def pick(key: str) -> str:
        return variables.get(key) or env.get("CUSTOM_ENV_" + key, "")

    job_id = str(response.get("id", "")) or env.get("CUSTOM_ENV_CI_JOB_ID", "")
    if not job_id.isdigit() or len(job_id) > 20:
        raise SystemFailure(
            f"no valid job id (got {job_id!r}): nspawn-runner's stages must be called by "
            "gitlab-runner, which sets JOB_RESPONSE_FILE or CUSTOM_ENV_CI_JOB_ID")
    git_info = response.get("git_info")
    repo_url = str(git_info.get("repo_url", "")) if isinstance(git_info, dict) else ""
    repo_url = repo_url or pick("CI_REPOSITORY_URL")
    project_path = (project_path_from_url(repo_url)
                    or project_path_from_url("/" + pick("CI_PROJECT_PATH"))
                    or f"project-{pick('CI_PROJECT_ID') or job_id}")
    return Job(
        job_id=job_id,
        server=_server(pick("CI_SERVER_URL") or repo_url),
        runner_id=pick("CI_RUNNER_ID"),
        project_path=project_path,
        image_ref=env.get("CUSTOM_ENV_CI_JOB_IMAGE", ""),
    )


def register_secrets(env: Mapping[str, str], response: Mapping[str, object],
                     variables: Mapping[str, str], secret_names: tuple[str, ...]) -> None:
    token = response.get("token")
    if isinstance(token, str):
        log.add_secret(token)
    for name in (*_SECRET_VARIABLES, *secret_names):
        log.add_secret(env.get("CUSTOM_ENV_" + name, ""))
        log.add_secret(variables.get(name, ""))
    raw = response.get("variables")
    for var in raw if isinstance(raw, list) else []:
        if isinstance(var, dict) and var.get("masked"):
            log.add_secret(str(var.get("value", "")))
