"""Whether a job (or the pipeline) would be created, as GitLab decides it: `rules` (the first
rule whose clauses all hold wins; none matching means `never`), and the older `only`/`except`
(all `only` conditions must hold; any `except` condition excludes).

Locally there is one pipeline: a push of the current branch (or tag). `rules:changes` and
`only:changes` hold, as they do in GitLab when a pipeline has no pushed changes to compare
(new branches, web and scheduled pipelines); the caller reports that in the job's notes."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nspawn_runner.local.ci_expr import ExprSyntaxError, compile_regex, truthful

JOB_RULE_KEYS = frozenset({"if", "changes", "exists", "when", "start_in", "allow_failure",
                           "variables", "needs", "interruptible"})
WORKFLOW_RULE_KEYS = frozenset({"if", "changes", "exists", "when", "variables", "auto_cancel"})
JOB_RULE_WHEN = ("on_success", "on_failure", "always", "never", "manual", "delayed")
WORKFLOW_RULE_WHEN = ("always", "never")
SOURCES = ("api", "chat", "external", "external_pull_request_event", "merge_request_event",
           "parent_pipeline", "pipeline", "push", "schedule", "trigger", "web", "webide")


class RuleError(ValueError):
    """A rule GitLab would reject; the message names the rule."""


@dataclass(frozen=True)
class Context:
    """What rules are evaluated against."""

    variables: Mapping[str, str]
    file_exists: Callable[[str], bool] = lambda _glob: False


@dataclass(frozen=True)
class Outcome:
    when: str  # "never" when excluded
    reason: str  # for people: which rule decided, and why
    allow_failure: bool | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)  # rules:variables, unparsed
    start_in: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def included(self) -> bool:
        return self.when != "never"


def flatten_rules(rules: object, where: str) -> list[dict[str, Any]]:
    """Rules may nest arrays (from !reference) up to 10 levels; GitLab flattens them."""
    out: list[dict[str, Any]] = []

    def walk(item: object, depth: int) -> None:
        if isinstance(item, list):
            if depth > 10:
                raise RuleError(f"{where} nests arrays more than 10 levels deep")
            for sub in item:
                walk(sub, depth + 1)
        elif isinstance(item, dict) and item:
            out.append(item)
        else:
            raise RuleError(f"{where} should be an array of hashes (got {item!r})")

    walk(rules, 0)
    return out


def _check_rule(rule: dict[str, Any], where: str, allowed: frozenset[str],
                whens: Sequence[str]) -> None:
    unknown = sorted(set(rule) - allowed)
    if unknown:
        raise RuleError(f"{where} config contains unknown keys: {', '.join(unknown)}")
    when = rule.get("when")
    if when is not None and when not in whens:
        raise RuleError(f"{where} when should be one of: {', '.join(whens)} (got {when!r})")
    if "if" in rule and rule["if"] is not None:
        try:
            truthful(rule["if"], {})
        except ExprSyntaxError as e:
            raise RuleError(f"{where} if: invalid expression syntax: {e}: {rule['if']!r}") from e
    if "allow_failure" in rule and not isinstance(rule["allow_failure"], bool | None):
        raise RuleError(f"{where} allow_failure should be a boolean value")
    if rule.get("when") == "delayed" and not rule.get("start_in"):
        raise RuleError(f"{where} start_in should be set with when: delayed")
    if "variables" in rule and not isinstance(rule["variables"], dict | None):
        raise RuleError(f"{where} variables should be a hash of key value pairs")


def _globs(value: object, key: str, where: str) -> tuple[list[str], dict[str, Any]]:
    if isinstance(value, dict):
        extra = {k: v for k, v in value.items() if k != "paths"}
        value = value.get("paths", [])
    else:
        extra = {}
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RuleError(f"{where} {key} should be an array of strings or a hash with paths")
    return value, extra


def _clauses_hold(rule: dict[str, Any], ctx: Context, where: str,
                  notes: list[str]) -> bool:
    if rule.get("if") is not None and not truthful(rule["if"], ctx.variables):
        return False
    if "exists" in rule:
        globs, extra = _globs(rule["exists"], "exists", where)
        if extra:
            raise RuleError(f"{where} exists: {', '.join(sorted(extra))} (files of another "
                            "project or ref) cannot be checked locally; use exists: paths only")
        if not any(ctx.file_exists(expand_existing(g, ctx.variables)) for g in globs):
            return False
    if "changes" in rule:
        _globs(rule["changes"], "changes", where)
        notes.append(f"{where} changes: treated as true (no pushed changes to compare, as "
                     "GitLab does for new branches)")
    return True


def expand_existing(value: str, variables: Mapping[str, str]) -> str:
    """$VAR and ${VAR} replaced when defined, kept otherwise (GitLab's expand_existing)."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return variables.get(name, m.group(0)) if name else m.group(0)

    return re.sub(r"\$([A-Za-z_][A-Za-z0-9_]*)|\$\{([A-Za-z_][A-Za-z0-9_]*)\}"
                  r"|%([A-Za-z_][A-Za-z0-9_]*)%", sub, value)


def evaluate_rules(rules: list[dict[str, Any]], ctx: Context, *, default_when: str,
                   where: str, workflow: bool = False) -> Outcome:
    allowed = WORKFLOW_RULE_KEYS if workflow else JOB_RULE_KEYS
    whens = WORKFLOW_RULE_WHEN if workflow else JOB_RULE_WHEN
    for i, rule in enumerate(rules):
        _check_rule(rule, f"{where}:rules:{i}", allowed, whens)
    notes: list[str] = []
    for i, rule in enumerate(rules):
        if _clauses_hold(rule, ctx, f"{where}:rules:{i}", notes):
            when = rule.get("when") or default_when
            shown = f" (if: {rule['if']})" if rule.get("if") else ""
            return Outcome(
                when=when,
                reason=f"rule {i + 1}{shown} matched: when {when}",
                allow_failure=rule.get("allow_failure"),
                variables=rule.get("variables") or {},
                start_in=rule.get("start_in"),
                notes=tuple(notes),
            )
    return Outcome(when="never", reason=f"no rule of {where}:rules matched", notes=tuple(notes))


# ---- only / except ----------------------------------------------------------------------

_REF_KEYWORDS = {"branches", "tags"}


def _policy(value: object, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        value = {"refs": value}
    if not isinstance(value, dict) or not value:
        raise RuleError(f"{where} has to be either an array of conditions or a hash")
    unknown = sorted(set(value) - {"refs", "variables", "changes", "kubernetes"})
    if unknown:
        raise RuleError(f"{where} config contains unknown keys: {', '.join(unknown)}")
    for key in ("refs", "variables"):
        items = value.get(key)
        if items is not None and (not isinstance(items, list)
                                  or not all(isinstance(x, str) for x in items)):
            raise RuleError(f"{where}:{key} should be an array of strings")
    for expression in value.get("variables") or []:
        try:
            truthful(expression, {})
        except ExprSyntaxError as e:
            raise RuleError(f"{where}:variables: invalid expression syntax: {e}: "
                            f"{expression!r}") from e
    return value


def _ref_matches(pattern: str, ctx: Context) -> bool:
    v = ctx.variables
    pattern, _, path = pattern.partition("@")
    if path and path != v.get("CI_PROJECT_PATH"):
        return False
    source = v.get("CI_PIPELINE_SOURCE", "push")
    if pattern == "tags" and v.get("CI_COMMIT_TAG"):
        return True
    if pattern == "branches" and v.get("CI_COMMIT_BRANCH"):
        return True
    plural = {"push": "pushes", "merge_request_event": "merge_requests",
              "schedule": "schedules", "trigger": "triggers", "pipeline": "pipelines"}
    if pattern in (source, plural.get(source, source + "s")):
        return True
    ref = v.get("CI_COMMIT_REF_NAME", "")
    if len(pattern) > 1 and pattern.startswith("/") and pattern.endswith("/"):
        regex = compile_regex(pattern)
        return bool(regex and regex.compiled.search(ref))
    return pattern == ref


def _policy_parts(policy: dict[str, Any], ctx: Context, notes: list[str],
                  where: str) -> list[bool]:
    parts = []
    if "refs" in policy:
        parts.append(any(_ref_matches(p, ctx) for p in policy["refs"] or []))
    if "variables" in policy:
        parts.append(any(truthful(e, ctx.variables) for e in policy["variables"] or []))
    if "changes" in policy:
        notes.append(f"{where}:changes treated as true (no pushed changes to compare)")
        parts.append(True)
    if "kubernetes" in policy:
        notes.append(f"{where}:kubernetes is false locally (no Kubernetes integration)")
        parts.append(False)
    return parts


def evaluate_only_except(only: object, except_: object, ctx: Context, *, default_when: str,
                         where: str) -> Outcome:
    notes: list[str] = []
    only_policy = _policy(only, f"{where}:only") if only is not None else {
        "refs": ["branches", "tags"]}
    except_policy = _policy(except_, f"{where}:except") if except_ is not None else None
    if not all(_policy_parts(only_policy, ctx, notes, f"{where}:only")):
        return Outcome("never", "only: does not match this pipeline", notes=tuple(notes))
    if except_policy and any(_policy_parts(except_policy, ctx, notes, f"{where}:except")):
        return Outcome("never", "except: matches this pipeline", notes=tuple(notes))
    return Outcome(default_when, f"only/except: when {default_when}", notes=tuple(notes))


# ---- file globs --------------------------------------------------------------------------

def fnmatch_regex(glob: str) -> re.Pattern[str]:
    """Ruby's File.fnmatch with FNM_PATHNAME | FNM_DOTMATCH | FNM_EXTGLOB, which GitLab uses for
    `rules:exists` and `rules:changes`: `*` and `?` stop at `/`, `**/` spans directories,
    `[...]` classes, `{a,b}` alternatives, `\\` escapes."""
    return re.compile(r"\A" + _translate(glob) + r"\Z", re.S)


def _translate(glob: str) -> str:
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if glob.startswith("**/", i):
                out.append("(?:[^/]*/)*")
                i += 3
                continue
            while i < n and glob[i] == "*":
                i += 1
            out.append("[^/]*")
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        elif c == "[":
            end = glob.find("]", i + 2 if glob[i + 1:i + 2] in ("!", "^") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1:end]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\").replace("]", "\\]")
                out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
                i = end
        elif c == "{":
            depth, j, alts, start = 0, i, [], i + 1
            while j < n:
                if glob[j] == "{":
                    depth += 1
                elif glob[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                elif glob[j] == "," and depth == 1:
                    alts.append(glob[start:j])
                    start = j + 1
                j += 1
            if j >= n:
                out.append(re.escape(c))
            else:
                alts.append(glob[start:j])
                out.append("(?:" + "|".join(_translate(a) for a in alts) + ")")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)
