import json
from pathlib import Path

import pytest

from nspawn_runner import log
from nspawn_runner.errors import SystemFailure
from nspawn_runner.executor import identity


def response(tmp_path: Path, **data: object) -> dict[str, str]:
    path = tmp_path / "response.json"
    path.write_text(json.dumps(data))
    return {"JOB_RESPONSE_FILE": str(path)}


VARS = [{"key": "CI_SERVER_URL", "value": "https://gitlab.example.com"},
        {"key": "CI_RUNNER_ID", "value": "7"},
        {"key": "CI_RUNNER_ID", "value": "999"}]  # a later user variable does not win


def test_identity_from_response_file(tmp_path: Path) -> None:
    env = response(tmp_path, id=1234, token="tok-secret-123",
                   git_info={"repo_url": "https://gitlab-ci-token:tok-secret-123@gitlab.example.com/g/sub/p.git"},
                   variables=VARS)
    # Job variables the author controls do not change the identity.
    env |= {"CUSTOM_ENV_CI_JOB_ID": "1", "CUSTOM_ENV_CI_RUNNER_ID": "1"}
    j = identity.load(env)
    assert j.job_id == "1234"
    assert j.server == "gitlab.example.com"
    assert j.runner_id == "7"
    assert j.project_path == "g/sub/p"
    assert identity.is_machine_name(j.machine)
    assert j.machine.startswith("nr-1234-")
    assert j.unit == f"nspawn-runner-{j.machine}.service"


def test_names_differ_across_runners_and_instances(tmp_path: Path) -> None:
    a = identity.Job("5", "gitlab.a", "1", "g/p", "")
    assert a.machine != identity.Job("5", "gitlab.b", "1", "g/p", "").machine
    assert a.machine != identity.Job("5", "gitlab.a", "2", "g/p", "").machine
    assert a.machine == identity.Job("5", "gitlab.a", "1", "other/p", "x").machine
    assert len(a.machine) <= 64


def test_no_response_file_is_refused() -> None:
    # Without the trusted payload, job variables would name the machine: refused.
    with pytest.raises(SystemFailure, match="JOB_RESPONSE_FILE is not set"):
        identity.load({"CUSTOM_ENV_CI_JOB_ID": "42", "CUSTOM_ENV_CI_PROJECT_PATH": "g/p"})


@pytest.mark.parametrize("job_id", ["", "abc", "1;2", "../1", "1" * 21])
def test_invalid_job_id(tmp_path: Path, job_id: str) -> None:
    env = response(tmp_path, id=job_id) | {"CUSTOM_ENV_CI_JOB_ID": "42"}
    with pytest.raises(SystemFailure, match="job id"):
        identity.load(env)


def test_job_dir_timeout_and_image(tmp_path: Path) -> None:
    env = response(tmp_path, id=9, runner_info={"timeout": 3600}, variables=VARS)
    env["CUSTOM_ENV_CI_JOB_IMAGE"] = "debian:sid"
    j = identity.load(env)
    assert (j.job_dir, j.timeout, j.image_ref) == (str(tmp_path), 3600, "debian:sid")


def test_unreadable_response_file(tmp_path: Path) -> None:
    with pytest.raises(SystemFailure, match="job response file"):
        identity.load({"JOB_RESPONSE_FILE": str(tmp_path / "nope.json")})


@pytest.mark.parametrize(
    ("url", "path"),
    [("https://h/g/p.git", "g/p"), ("https://h/g/p", "g/p"), ("https://h/a/b/c.git", "a/b/c"),
     ("https://h/../etc", None), ("https://h/", None), ("https://h/g/p%2F..", None)],
)
def test_project_path(url: str, path: str | None) -> None:
    assert identity.project_path_from_url(url) == path


def test_secrets_are_registered(tmp_path: Path) -> None:
    env = response(tmp_path, id=1, token="the-job-token-value",
                   variables=[{"key": "MY_PASSWORD", "value": "hunter2hunter2", "masked": True},
                              {"key": "DEPLOY_KEY", "value": "deploy-key-value"}])
    env["CUSTOM_ENV_CI_REGISTRY_PASSWORD"] = "registry-password"
    identity.load(env, secret_names=("DEPLOY_KEY",))
    text = log.mask("a the-job-token-value b hunter2hunter2 c registry-password d "
                    "deploy-key-value https://user:pw@host/x")
    for secret in ("the-job-token-value", "hunter2hunter2", "registry-password",
                   "deploy-key-value", "user:pw"):
        assert secret not in text
    assert text.count(log.MASK) == 5
