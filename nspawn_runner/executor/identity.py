"""Who the current job is, from what gitlab-runner hands every stage call.

The job response file (JOB_RESPONSE_FILE, written by gitlab-runner, mode 0600) is the only
trusted source, and the stages refuse to run without it: job variables (CUSTOM_ENV_*) can be set
by the job's author, so nothing that names a machine, a unit, a host path or a limit is taken
from them (pitfall 3). The job's image is the one exception: choosing it is the job's right.
Imported on the `run` hot path: stdlib only, and only cheap imports (no re, urllib, hashlib,
dataclasses or typing)."""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping

from nspawn_runner import log
from nspawn_runner.errors import SystemFailure
from nspawn_runner.record import Record

# Unit and machine names share this prefix; `gc` and the tests recognise ours by it.
UNIT_PREFIX = "nspawn-runner-"
MACHINE_PREFIX = "nr-"
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_HEX = frozenset("0123456789abcdef")
# Predefined variables whose values are credentials.
_SECRET_VARIABLES = ("CI_JOB_TOKEN", "CI_BUILD_TOKEN", "CI_REGISTRY_PASSWORD",
                     "CI_DEPENDENCY_PROXY_PASSWORD", "CI_JOB_JWT", "CI_JOB_JWT_V2")


class Job(Record):
    job_id: str
    server: str  # host[:port] of the GitLab instance
    runner_id: str
    project_path: str  # group/project, as gitlab-runner lays out builds and caches
    image_ref: str  # CI_JOB_IMAGE, "" when the job names none
    # The directory gitlab-runner made for this job (it holds JOB_RESPONSE_FILE) and removes
    # after cleanup: while it exists, the job is not over (pitfall 17).
    job_dir: str = ""
    timeout: int = 0  # runner_info.timeout: seconds the whole job may take; 0: unknown

    @property
    def machine(self) -> str:
        """Unique per job on one host, even with several runners or GitLab instances: the job
        id is unique within one instance, and the instance and runner go into the hash."""
        key = f"{self.server}\0{self.runner_id}".encode()
        # crc32, not sha256: hashlib costs `run` 2 ms of imports, and the job id in the name
        # already makes it unique within an instance; this only separates instances/runners.
        digest = f"{zlib.crc32(key):08x}"
        return f"{MACHINE_PREFIX}{self.job_id}-{digest}"

    @property
    def unit(self) -> str:
        return f"{UNIT_PREFIX}{self.machine}.service"


def is_machine_name(name: str) -> bool:
    """`nr-<job id>-<8 hex digits>`, as `Job.machine` makes them."""
    prefix, _, rest = name.partition("-")
    job_id, _, digest = rest.partition("-")
    return (prefix + "-" == MACHINE_PREFIX and job_id.isdigit() and len(job_id) <= 20
            and job_id.isascii() and len(digest) == 8 and set(digest) <= _HEX)


def _valid_component(part: str) -> bool:
    return (bool(part) and set(part) <= _NAME_CHARS and part[0] not in ".-"
            and part not in (".", ".."))


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
    rest = url.split("://", 1)[1] if "://" in url else url
    path = rest.partition("/")[2].split("?", 1)[0].split("#", 1)[0]
    path = path.strip("/").removesuffix(".git")
    if not path or not all(_valid_component(p) for p in path.split("/")):
        return None
    return path


def _server(url: str) -> str:
    """host[:port] of a URL, without credentials."""
    if "://" not in url:
        return ""
    return url.split("://", 1)[1].partition("/")[0].rpartition("@")[2]


def load(environ: Mapping[str, str] | None = None, secret_names: tuple[str, ...] = ()) -> Job:
    """`secret_names`: the settings' extra secret variables, masked like the predefined ones."""
    env = os.environ if environ is None else environ
    path = env.get("JOB_RESPONSE_FILE")
    if not path:
        raise SystemFailure(
            "JOB_RESPONSE_FILE is not set: nspawn-runner's stages must be called by "
            "gitlab-runner's custom executor (or `nspawn-runner exec`), which writes the job's "
            "payload there; job variables alone are not trusted to name a job")
    try:
        with open(path, "rb") as f:
            loaded = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemFailure(f"cannot read the job response file {path}: {e}") from None
    response: dict[str, object] = loaded if isinstance(loaded, dict) else {}
    variables = _variables(response)
    register_secrets(env, response, variables, secret_names)

    def pick(key: str) -> str:
        return variables.get(key, "")

    job_id = str(response.get("id", ""))
    if not job_id.isdigit() or len(job_id) > 20:
        raise SystemFailure(
            f"the job response file {path} has no valid job id (got {job_id!r}); "
            "it is not a gitlab-runner job payload")
    git_info = response.get("git_info")
    repo_url = str(git_info.get("repo_url", "")) if isinstance(git_info, dict) else ""
    repo_url = repo_url or pick("CI_REPOSITORY_URL")
    runner_info = response.get("runner_info")
    timeout = runner_info.get("timeout") if isinstance(runner_info, dict) else None
    project_path = (project_path_from_url(repo_url)
                    or project_path_from_url("/" + pick("CI_PROJECT_PATH"))
                    or f"project-{pick('CI_PROJECT_ID') or job_id}")
    return Job(
        job_id=job_id,
        server=_server(pick("CI_SERVER_URL") or repo_url),
        runner_id=pick("CI_RUNNER_ID"),
        project_path=project_path,
        image_ref=env.get("CUSTOM_ENV_CI_JOB_IMAGE", ""),
        job_dir=os.path.dirname(os.path.abspath(path)),
        timeout=timeout if isinstance(timeout, int) and timeout > 0 else 0,
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
