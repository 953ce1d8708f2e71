"""The resolved form of a .gitlab-ci.yml job: everything `exec` needs to run it, frozen."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nspawn_runner.local.ci_rules import Outcome
from nspawn_runner.local.ci_variables import Variable


@dataclass(frozen=True)
class AllowFailure:
    allowed: bool = False  # allow_failure: true, whatever the exit code
    exit_codes: tuple[int, ...] = ()  # allow_failure: {exit_codes: [...]}

    def permits(self, exit_code: int) -> bool:
        return self.allowed or exit_code in self.exit_codes


@dataclass(frozen=True)
class Cache:
    key: str  # as written; the runner expands it ("default" when none is given)
    paths: tuple[str, ...]
    policy: str  # pull, push, pull-push (or a $VARIABLE the runner expands)
    when: str  # on_success, on_failure, always
    fallback_keys: tuple[str, ...] = ()
    unprotect: bool = False


@dataclass(frozen=True)
class Artifacts:
    paths: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    when: str = "on_success"  # on_success, on_failure, always
    name: str | None = None
    expire_in: str | None = None


@dataclass(frozen=True)
class Environment:
    name: str  # expanded, as GitLab expands it
    url: str | None = None
    action: str = "start"
    tier: str = "other"


@dataclass(frozen=True)
class ResolvedJob:
    name: str
    stage: str
    image: str | None  # as written (`image:name`); the runner expands variables in it
    before_script: tuple[str, ...]
    script: tuple[str, ...]
    after_script: tuple[str, ...]
    variables: tuple[Variable, ...]  # every variable of the job, as the server sends them
    allow_failure: AllowFailure
    timeout: int | None  # seconds; None: the project's default
    timeout_text: str | None
    caches: tuple[Cache, ...]
    artifacts: Artifacts | None
    when: str  # on_success, manual, ... or never when excluded
    included: bool  # whether GitLab would create this job in this pipeline
    rules_reason: str  # why (which rule matched, workflow:rules, only/except)
    environment: Environment | None
    dependencies: tuple[str, ...]  # jobs whose artifacts GitLab would download first
    notes: tuple[str, ...]  # what behaves differently locally, said once
    source_name: str = ""  # the job's key in the YAML (differs for parallel instances)

    def variable(self, key: str) -> str | None:
        for v in self.variables:
            if v.key == key:
                return v.value
        return None


@dataclass(frozen=True)
class JobSummary:
    name: str
    stage: str
    when: str
    included: bool
    reason: str
    problems: tuple[str, ...]  # unsupported keywords: the job cannot run locally


@dataclass(frozen=True)
class Instance:
    """One job GitLab would create: a YAML job, or one of its `parallel` instances."""

    key: str  # the job's key in the YAML
    name: str  # the job's name: the key, or "key 2/3", "key: [a, b]"
    node_index: int | None = None
    node_total: int | None = None
    matrix: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Pipeline:
    """A .gitlab-ci.yml resolved up to its jobs (includes, extends, references, defaults,
    stages, workflow:rules), with the variables every job starts from."""

    source: str
    config: Mapping[Any, Any]
    stages: tuple[str, ...]
    default: Mapping[str, Any]
    global_variables: tuple[Variable, ...]
    workflow: Outcome
    workflow_variables: tuple[Variable, ...]
    predefined: tuple[Variable, ...]
    cli: tuple[Variable, ...]
    instances: Mapping[str, Instance]
    file_exists: Callable[[str], bool]
    included: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
