"""One job of a resolved pipeline, as GitLab would create it: its keys checked, `default:`
applied (with `inherit:default`), its variables layered and expanded, its rules evaluated."""

from __future__ import annotations

from typing import Any

from nspawn_runner.local import ci_keywords as kw
from nspawn_runner.local.ci_loader import ConfigError, Unsupported
from nspawn_runner.local.ci_model import AllowFailure, Environment, Instance, Pipeline, ResolvedJob
from nspawn_runner.local.ci_rules import (
    Context,
    RuleError,
    evaluate_only_except,
    evaluate_rules,
    flatten_rules,
)
from nspawn_runner.local.ci_variables import (
    Variable,
    VariableError,
    as_mapping,
    collect,
    expand_blank,
    parse_block,
    server_expand,
    slugify,
)

DEFAULT_KEYS = ("after_script", "artifacts", "before_script", "cache", "hooks", "id_tokens",
                "image", "interruptible", "retry", "services", "tags", "timeout")
SUPPORTED_KEYS = frozenset({
    "after_script", "allow_failure", "artifacts", "before_script", "cache", "dependencies",
    "environment", "except", "extends", "image", "inherit", "needs", "only", "parallel",
    "rules", "script", "services", "stage", "start_in", "timeout", "type", "variables", "when",
})
# Keys that change nothing in a run on this machine; named once in the job's notes.
NO_EFFECT_KEYS = frozenset({"coverage", "interruptible", "manual_confirmation", "pages",
                            "publish", "resource_group", "retry", "tags"})
UNSUPPORTED_KEYS = {
    "trigger": "downstream pipelines need a GitLab server",
    "release": "releases are made by the GitLab server",
    "secrets": "external secrets are fetched through the GitLab server",
    "id_tokens": "ID tokens are signed by the GitLab server",
    "hooks": "hooks:pre_get_sources_script is not supported yet",
    "dast_configuration": "DAST profiles live on the GitLab server",
    "identity": "identity federation needs the GitLab server",
    "run": "CI/CD steps (run:) are not supported yet",
}
JOB_KEYS = SUPPORTED_KEYS | NO_EFFECT_KEYS | UNSUPPORTED_KEYS.keys()
JOB_WHEN = ("on_success", "on_failure", "always", "manual", "delayed")


def _inherit(value: object, where: str) -> tuple[bool | list[str], bool | list[str]]:
    if value is None:
        return True, True
    if not isinstance(value, dict):
        raise kw.KeywordError(f"{where}:inherit config should be a hash")
    unknown = sorted(set(value) - {"default", "variables"})
    if unknown:
        raise kw.KeywordError(f"{where}:inherit config contains unknown keys: "
                              f"{', '.join(unknown)}")
    out: list[bool | list[str]] = []
    for key in ("default", "variables"):
        item = value.get(key, True)
        if isinstance(item, bool):
            out.append(item)
        elif isinstance(item, list) and all(isinstance(i, str) for i in item):
            if key == "default" and set(item) - set(DEFAULT_KEYS):
                raise kw.KeywordError(f"{where}:inherit:default config contains unknown "
                                      f"values: {', '.join(sorted(set(item) - set(DEFAULT_KEYS)))}")
            out.append(item)
        else:
            raise kw.KeywordError(f"{where}:inherit:{key} should be a bool or array of strings")
    return out[0], out[1]


def _inherits(rule: bool | list[str], key: str) -> bool:
    return rule if isinstance(rule, bool) else key in rule


def _stage_of(config: object) -> object:
    return (config.get("stage") or config.get("type") or "test") if isinstance(config, dict) \
        else None


def resolve(p: Pipeline, inst: Instance) -> ResolvedJob:
    """Raises ConfigError (GitLab would refuse the pipeline) or Unsupported (the job uses
    what exec cannot do: every such keyword of the job, one per line)."""
    where = f"jobs:{inst.key}"
    raw = p.config[inst.key]
    if not isinstance(raw, dict):
        raise kw.KeywordError(f"{where} config should be a hash")
    unknown = sorted(map(str, set(raw) - JOB_KEYS))
    if unknown:
        raise kw.KeywordError(f"{where} config contains unknown keys: {', '.join(unknown)}")
    if not raw.keys() & {"script", "trigger", "run"}:
        raise kw.KeywordError(f"{where} config should implement the script:, run:, or trigger: "
                              "keyword")
    if raw.get("rules") is not None:
        for key in ("only", "except", "start_in"):
            if raw.get(key) is not None:
                raise kw.KeywordError(f"{where} config key may not be used with `rules`: {key}")
    inherit_default, inherit_variables = _inherit(raw.get("inherit"), where)
    job: dict[str, Any] = dict(raw)
    for key in DEFAULT_KEYS:
        if job.get(key) is None and _inherits(inherit_default, key) and \
                p.default.get(key) is not None:
            job[key] = p.default[key]

    unsupported = [f"{where}:{key}: {why}" for key, why in UNSUPPORTED_KEYS.items()
                   if job.get(key) is not None]
    if job.get("services"):
        unsupported.append(f"{where}:services: service containers are not supported yet; "
                           "start the service in before_script (the machine runs systemd)")
    notes: list[str] = []

    def attempt(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Unsupported as e:
            unsupported.append(str(e))
            return None

    stage = _stage_of(job)
    if not isinstance(stage, str) or stage not in p.stages:
        raise kw.KeywordError(f"{where} chosen stage {stage} does not exist; available stages "
                              f"are {', '.join(p.stages)}")
    before = kw.commands(job["before_script"], f"{where}:before_script") \
        if job.get("before_script") is not None else ()
    after = kw.commands(job["after_script"], f"{where}:after_script") \
        if job.get("after_script") is not None else ()
    script: tuple[str, ...] = ()
    if "script" in job:
        script = kw.commands(job["script"], f"{where}:script")
        if not script:
            raise kw.KeywordError(f"{where}:script can't be blank")
    image = attempt(kw.image, job.get("image"), f"{where}:image", notes)
    when = job.get("when") or "on_success"
    if when not in JOB_WHEN:
        raise kw.KeywordError(f"{where} when should be one of: {', '.join(JOB_WHEN)}")
    if job.get("start_in") is not None and when != "delayed":
        raise kw.KeywordError(f"{where} start_in should be blank (it needs when: delayed)")
    allow = kw.allow_failure(job.get("allow_failure"), f"{where}:allow_failure")
    timeout = kw.timeout(job.get("timeout"), f"{where}:timeout")
    caches = attempt(kw.caches, job.get("cache"), f"{where}:cache") or ()
    artifacts = attempt(kw.artifacts, job.get("artifacts"), f"{where}:artifacts", notes)
    env = kw.environment(job.get("environment"), f"{where}:environment")
    need_list = attempt(kw.needs, job.get("needs"), f"{where}:needs") or []
    visible = {i.key for i in p.instances.values()}
    for name, _artifacts, optional in need_list:
        if name not in visible and not optional:
            raise kw.KeywordError(f"'{inst.key}' job needs '{name}' job, but '{name}' does not "
                                  "exist in the pipeline")
    dependencies = kw.strings(job.get("dependencies"), f"{where}:dependencies")
    for name in dependencies:
        if name not in visible:
            raise kw.KeywordError(f"{where} dependencies: undefined dependency: {name}")
    # Whose artifacts GitLab downloads first: the needed jobs, else `dependencies`, else
    # every job of the earlier stages.
    if job.get("needs") is not None:
        keys = [n for n, art, _o in need_list if art and n in visible]
    elif job.get("dependencies") is not None:
        keys = list(dependencies)
    else:
        earlier = set(p.stages[:p.stages.index(stage)])
        keys = [k for k in dict.fromkeys(i.key for i in p.instances.values())
                if _stage_of(p.config[k]) in earlier]
    from_jobs = [i.name for k in keys for i in p.instances.values() if i.key == k]
    no_effect = sorted(k for k in NO_EFFECT_KEYS if job.get(k) not in (None, False))
    if no_effect:
        notes.append(f"{', '.join(no_effect)}: no effect in a local run")

    try:
        return _finish(p, inst, job, where, stage, when, allow, env, notes, unsupported,
                       inherit_variables, before, script, after, image, timeout, caches,
                       artifacts, from_jobs)
    except (RuleError, VariableError) as e:
        raise ConfigError(str(e)) from None


def _finish(p: Pipeline, inst: Instance, job: dict[str, Any], where: str, stage: str,
            when: str, allow: AllowFailure | None, env: dict[str, Any] | None,
            notes: list[str], unsupported: list[str], inherit_variables: bool | list[str],
            before: tuple[str, ...], script: tuple[str, ...], after: tuple[str, ...],
            image: str | None, timeout: int | None, caches: Any, artifacts: Any,
            from_jobs: list[str]) -> ResolvedJob:
    job_predefined = [
        Variable("CI_JOB_NAME", inst.name, source="predefined"),
        Variable("CI_JOB_NAME_SLUG", slugify(inst.name), source="predefined"),
        Variable("CI_JOB_STAGE", stage, source="predefined"),
    ]
    if inst.node_total is not None:
        job_predefined += [Variable("CI_NODE_INDEX", str(inst.node_index), source="predefined"),
                           Variable("CI_NODE_TOTAL", str(inst.node_total), source="predefined")]
    else:
        job_predefined.append(Variable("CI_NODE_TOTAL", "1", source="predefined"))
    inherited = [v for v in (*p.global_variables, *p.workflow_variables)
                 if _inherits(inherit_variables, v.key)]
    own = parse_block(job.get("variables"), f"{where}:variables", source="job")
    matrix = [Variable(k, v, source="parallel:matrix") for k, v in inst.matrix]
    context = collect(p.predefined, job_predefined, inherited, own, matrix, p.cli)
    ctx = Context(as_mapping(context), p.file_exists)
    if job.get("rules") is not None:
        outcome = evaluate_rules(flatten_rules(job["rules"], f"{where}:rules"), ctx,
                                 default_when=when, where=where)
    else:
        outcome = evaluate_only_except(job.get("only"), job.get("except"), ctx,
                                       default_when=when, where=where)
    notes.extend(outcome.notes)
    rule_variables = parse_block(outcome.variables, f"{where}:rules:variables", source="rules")
    final_when = outcome.when
    if outcome.allow_failure is not None:
        allow = AllowFailure(allowed=outcome.allow_failure)
    elif allow is None:
        # A manual job may fail unless it says otherwise; not when rules made it manual.
        allow = AllowFailure(allowed=when == "manual" and job.get("rules") is None)
    if final_when == "manual":
        job_predefined.append(Variable("CI_JOB_MANUAL", "true", source="predefined"))
        notes.append("when: manual: exec runs it since you asked for it")
    elif final_when == "delayed":
        notes.append(f"when: delayed (start_in {outcome.start_in or job.get('start_in')}): "
                     "exec runs it at once")
    layers = [p.predefined, job_predefined, inherited, own, matrix, rule_variables, p.cli]
    variables = server_expand(collect(*layers), where)
    environment = None
    if env is not None:
        values = as_mapping(variables)
        name = expand_blank(env["name"], values)
        url = expand_blank(env["url"], values) if isinstance(env.get("url"), str) else None
        tier = env.get("deployment_tier") or kw.environment_tier(name)
        environment = Environment(name, url, env.get("action", "start"), str(tier))
        deployment = [Variable("CI_ENVIRONMENT_NAME", name, source="predefined"),
                      Variable("CI_ENVIRONMENT_SLUG", kw.environment_slug(name),
                               source="predefined"),
                      Variable("CI_ENVIRONMENT_ACTION", environment.action, source="predefined"),
                      Variable("CI_ENVIRONMENT_TIER", environment.tier, source="predefined"),
                      *([Variable("CI_ENVIRONMENT_URL", url, source="predefined")] if url
                        else [])]
        variables = server_expand(collect(p.predefined, job_predefined, deployment, *layers[2:]),
                                  where)
        notes.append(f"environment {name}: no deployment is recorded locally")
    if unsupported:
        raise Unsupported("\n".join(unsupported))
    included = p.workflow.included and outcome.included
    reason = outcome.reason if p.workflow.included else f"workflow: {p.workflow.reason}"
    return ResolvedJob(
        name=inst.name,
        stage=stage,
        image=image,
        before_script=before,
        script=script,
        after_script=after,
        variables=tuple(variables),
        allow_failure=allow,
        timeout=timeout,
        timeout_text=job.get("timeout"),
        caches=tuple(caches),
        artifacts=artifacts,
        when=final_when if included else "never",
        included=included,
        rules_reason=reason,
        environment=environment,
        dependencies=tuple(from_jobs),
        notes=tuple(notes),
        source_name=inst.key,
    )
