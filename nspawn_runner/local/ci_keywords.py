"""The keywords of a job's entries, checked and turned into values as GitLab's config entries
do (lib/gitlab/ci/config/entry): scripts, image, allow_failure, timeout, cache, artifacts,
parallel, environment, needs. Each function takes the raw YAML value and a location for its
messages, and raises KeywordError (GitLab would reject it) or Unsupported (GitLab accepts it,
exec cannot do it)."""

from __future__ import annotations

import hashlib
import itertools
import re
from typing import Any

from nspawn_runner.local.ci_duration import parse_seconds
from nspawn_runner.local.ci_loader import ConfigError, Unsupported
from nspawn_runner.local.ci_model import AllowFailure, Artifacts, Cache
from nspawn_runner.local.ci_variables import ruby_to_s

MAX_NESTING = 10
MAX_TIMEOUT = 2_629_746  # a month, GitLab's Project::MAX_BUILD_TIMEOUT
MAX_PARALLEL = 200
_POLICY = re.compile(r"pull-push|push|pull|\$\w{1,255}")
_WHEN_ARTIFACTS = ("on_success", "on_failure", "always")


class KeywordError(ConfigError):
    pass


def commands(value: object, where: str) -> tuple[str, ...]:
    """A script: a string, or nested arrays of strings (up to 10 levels), flattened."""
    out: list[str] = []

    def walk(item: object, depth: int) -> bool:
        if isinstance(item, str):
            out.append(item)
            return True
        if isinstance(item, list) and depth < MAX_NESTING:
            return all(walk(sub, depth + 1) for sub in item)
        return False

    if not walk(value, 0):
        raise KeywordError(f"{where} config should be a string or a nested array of strings up "
                           f"to {MAX_NESTING} levels deep")
    return tuple(out)


def strings(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise KeywordError(f"{where} should be an array of strings")
    return tuple(value)


def image(value: object, where: str, notes: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if not isinstance(value, dict) or "name" not in value:
        raise KeywordError(f"{where} config should be a string or a hash with name")
    unknown = sorted(set(value) - {"name", "entrypoint", "docker", "pull_policy",
                                   "kubernetes"})
    if unknown:
        raise KeywordError(f"{where} config contains unknown keys: {', '.join(unknown)}")
    if "docker" in value:
        raise Unsupported(f"{where}:docker (platform, user) is for the docker executor; "
                          "nspawn machines cannot honour it: remove it")
    for key in ("entrypoint", "pull_policy", "kubernetes"):
        if key in value:
            notes.append(f"{where}:{key} has no effect on nspawn machines (nor with this "
                         "driver on GitLab)")
    if not isinstance(value["name"], str):
        raise KeywordError(f"{where}:name should be a string")
    return value["name"]


def allow_failure(value: object, where: str) -> AllowFailure | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return AllowFailure(allowed=value)
    if isinstance(value, dict) and set(value) <= {"exit_codes"}:
        codes = value.get("exit_codes")
        codes = [codes] if isinstance(codes, int) and not isinstance(codes, bool) else codes
        if isinstance(codes, list) and codes and all(
                isinstance(c, int) and not isinstance(c, bool) for c in codes):
            return AllowFailure(exit_codes=tuple(codes))
        raise KeywordError(f"{where}:exit_codes should be an integer or an array of integers")
    raise KeywordError(f"{where} config should be a hash or a boolean value")


def timeout(value: object, where: str) -> int | None:
    if value is None:
        return None
    seconds = parse_seconds(value) if isinstance(value, str) else None
    if seconds is None:
        raise KeywordError(f"{where} config should be a duration (as in 1h 30m, 90 minutes; "
                           f"got {value!r})")
    if seconds >= MAX_TIMEOUT:
        raise KeywordError(f"{where} config should not exceed the limit (a month)")
    return int(seconds)


def _cache_key(value: object, where: str) -> str:
    if value is None:
        return "default"
    if isinstance(value, dict):
        raise Unsupported(f"{where}:key:files (a key from files' last commits) is not "
                          "supported by nspawn-runner exec; use a string key such as "
                          "$CI_COMMIT_REF_SLUG")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise KeywordError(f"{where}:key config should be a hash, a string or a symbol")
    key = str(value)
    if "/" in key or key.lower().count("%2f"):
        raise KeywordError(f"{where}:key config cannot contain the \"/\" character")
    if key in (".", "..") or key.lower() in ("%2e", "%2e%2e", ".%2e", "%2e."):
        raise KeywordError(f"{where}:key config cannot be \".\" or \"..\"")
    return key


def caches(value: object, where: str) -> tuple[Cache, ...]:
    if value is None:
        return ()
    entries = value if isinstance(value, list) else [value]
    if len(entries) > 4:
        raise KeywordError(f"{where} config no more than 4 caches can be created")
    out = []
    for i, entry in enumerate(entries):
        at = f"{where}:{i}" if isinstance(value, list) else where
        if not isinstance(entry, dict):
            raise KeywordError(f"{at} config should be a hash")
        unknown = sorted(set(entry) - {"key", "untracked", "paths", "when", "policy",
                                       "unprotect", "fallback_keys"})
        if unknown:
            raise KeywordError(f"{at} config contains unknown keys: {', '.join(unknown)}")
        if entry.get("untracked"):
            raise Unsupported(f"{at}:untracked is not supported by nspawn-runner exec; list "
                              "the paths to cache")
        policy = entry.get("policy") or "pull-push"
        if not isinstance(policy, str) or not _POLICY.search(policy):
            raise KeywordError(f"{at}:policy should be a variable or one of: pull-push, push, "
                               "pull")
        when = entry.get("when") or "on_success"
        if when not in _WHEN_ARTIFACTS:
            raise KeywordError(f"{at}:when should be one of: {', '.join(_WHEN_ARTIFACTS)}")
        fallback = strings(entry.get("fallback_keys"), f"{at}:fallback_keys")
        if len(fallback) > 5:
            raise KeywordError(f"{at}:fallback_keys has to many entries (maximum 5)")
        paths = strings(entry.get("paths"), f"{at}:paths")
        if paths:
            out.append(Cache(_cache_key(entry.get("key"), at), paths, policy, when, fallback,
                             bool(entry.get("unprotect"))))
    return tuple(out)


def artifacts(value: object, where: str, notes: list[str]) -> Artifacts | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise KeywordError(f"{where} config should be a hash")
    unknown = sorted(set(value) - {"name", "untracked", "paths", "reports", "when", "expire_in",
                                   "expose_as", "exclude", "public", "access"})
    if unknown:
        raise KeywordError(f"{where} config contains unknown keys: {', '.join(unknown)}")
    if value.get("untracked"):
        raise Unsupported(f"{where}:untracked is not supported by nspawn-runner exec; list "
                          "the paths to keep")
    when = value.get("when") or "on_success"
    if when not in _WHEN_ARTIFACTS:
        raise KeywordError(f"{where}:when should be one of: {', '.join(_WHEN_ARTIFACTS)}")
    expire_in = value.get("expire_in")
    if expire_in is not None and (not isinstance(expire_in, str) or (
            expire_in.lower() != "never" and parse_seconds(expire_in) is None)):
        raise KeywordError(f"{where}:expire_in should be a duration")
    name = value.get("name")
    if name is not None and not isinstance(name, str):
        raise KeywordError(f"{where}:name should be a string")
    if value.get("reports") is not None:
        if not isinstance(value["reports"], dict):
            raise KeywordError(f"{where}:reports config should be a hash")
        notes.append(f"{where}:reports ({', '.join(map(str, value['reports']))}) are not "
                     "collected locally; list their files under artifacts:paths to get them")
    paths = strings(value.get("paths"), f"{where}:paths")
    if not paths:
        return None
    return Artifacts(paths, strings(value.get("exclude"), f"{where}:exclude"), when, name,
                     expire_in)


def parallel(value: object, where: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(name suffix, matrix variables) of each instance; [] when not parallel."""
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_PARALLEL:
            raise KeywordError(f"{where} should be an integer from 1 to {MAX_PARALLEL}")
        return [(f" {i}/{value}", []) for i in range(1, value + 1)]
    if not isinstance(value, dict) or set(value) != {"matrix"}:
        raise KeywordError(f"{where} should be an integer or a hash with matrix")
    matrix = value["matrix"]
    if not isinstance(matrix, list) or not matrix:
        raise KeywordError(f"{where}:matrix config should be an array of hashes")
    instances: list[tuple[str, list[tuple[str, str]]]] = []
    for entry in matrix:
        if not isinstance(entry, dict) or not entry:
            raise KeywordError(f"{where}:matrix config should be an array of hashes")
        keys = [str(k) for k in entry]
        lists = []
        for k, v in entry.items():
            values = v if isinstance(v, list) else [v]
            if not values or any(isinstance(x, dict | list) or x is None for x in values):
                raise KeywordError(f"{where}:matrix:{k} should be a string or an array of "
                                   "strings")
            lists.append([ruby_to_s(x) for x in values])
        for combo in itertools.product(*lists):
            pairs = list(zip(keys, combo, strict=True))
            instances.append((": [" + ", ".join(combo) + "]", pairs))
    if len(instances) > MAX_PARALLEL:
        raise KeywordError(f"{where}:matrix generates too many jobs (maximum is "
                           f"{MAX_PARALLEL})")
    return instances


def environment_slug(name: str, hexdigest: str | None = None) -> str:
    """GitLab's CI_ENVIRONMENT_SLUG (Gitlab::Slug::Environment)."""
    slug = re.sub(r"[^a-z0-9]", "-", name.lower())
    if not re.match(r"[a-z]", slug):
        slug = "env-" + slug
    slug = re.sub(r"-+", "-", slug)
    if len(slug) > 24 or slug != name:
        digest = hexdigest or hashlib.sha256(name.encode()).hexdigest()
        slug = slug[:17]
        if not slug.endswith("-"):
            slug += "-"
        return slug + _base36(int(digest, 16))[-6:]
    return slug.removesuffix("-")


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while number:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
    return out or "0"


def environment_tier(name: str) -> str:
    """GitLab's guess of a deployment tier from the environment's name."""
    for pattern, tier in ((r"(dev|review|trunk)", "development"),
                          (r"(test|tst|int|ac(ce|)pt|qa|qc|control|quality)", "testing"),
                          (r"(st(a|)g|mod(e|)l|pre|demo|non)", "staging"),
                          (r"(pr(o|)d|live)", "production")):
        if re.search(pattern, name, re.I):
            return tier
    return "other"


def environment(value: object, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise KeywordError(f"{where} config should be a string or a hash with a name")
    unknown = sorted(set(value) - {"name", "url", "action", "deployment_tier", "on_stop",
                                   "auto_stop_in", "kubernetes"})
    if unknown:
        raise KeywordError(f"{where} config contains unknown keys: {', '.join(unknown)}")
    action = value.get("action", "start")
    if action not in ("start", "prepare", "stop", "verify", "access"):
        raise KeywordError(f"{where}:action should be start, prepare, stop, verify or access")
    return value


def needs(value: object, where: str) -> list[tuple[str, bool, bool]]:
    """(job, artifacts, optional) of each need."""
    if value is None:
        return []
    items: list[object] = []

    def walk(item: object) -> None:
        if isinstance(item, list):
            for sub in item:
                walk(sub)
        else:
            items.append(item)

    walk(value)
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, True, False))
            continue
        if not isinstance(item, dict) or "job" not in item:
            raise KeywordError(f"{where} config should be a job name or a hash with job")
        if "pipeline" in item or "project" in item:
            raise Unsupported(f"{where}: needs:{'pipeline' if 'pipeline' in item else 'project'}"
                              " (artifacts of another pipeline or project) is not supported "
                              "by nspawn-runner exec; put those files in the working tree")
        unknown = sorted(set(item) - {"job", "artifacts", "optional", "parallel"})
        if unknown:
            raise KeywordError(f"{where} config contains unknown keys: {', '.join(unknown)}")
        out.append((str(item["job"]), item.get("artifacts", True) is not False,
                    bool(item.get("optional"))))
    return out
