"""A .gitlab-ci.yml resolved as GitLab resolves it, for `nspawn-runner exec`.

    pipeline = ci_yaml.load(text, files=tree, predefined=variables, cli=["K=V"])
    ci_yaml.list_jobs(pipeline)          # every job GitLab would know, with its status
    job = ci_yaml.resolve_job(pipeline, "test")
    print(ci_yaml.preview(job))

Errors are CiConfigError: the message names the file or job, the keyword and the fix. A
keyword GitLab accepts but exec cannot honour (include:remote, trigger, services, ...) is
refused by name, never ignored; keywords that change nothing locally (tags, retry, ...) are
listed in the job's notes."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from nspawn_runner.errors import CiConfigError
from nspawn_runner.local import ci_jobs
from nspawn_runner.local import ci_keywords as kw
from nspawn_runner.local.ci_loader import ConfigError, ProjectFiles, Unsupported, load_config
from nspawn_runner.local.ci_model import Instance, JobSummary, Pipeline, ResolvedJob
from nspawn_runner.local.ci_rules import (
    Context,
    Outcome,
    RuleError,
    evaluate_rules,
    flatten_rules,
    fnmatch_regex,
)
from nspawn_runner.local.ci_variables import (
    Variable,
    VariableError,
    as_mapping,
    collect,
    parse_block,
    parse_cli,
)

__all__ = ["JobSummary", "Pipeline", "ResolvedJob", "list_jobs", "load", "preview",
           "resolve_job"]

# Top-level keys that are never jobs (GitLab's Root entry).
RESERVED = frozenset({"default", "include", "before_script", "image", "services",
                      "after_script", "variables", "stages", "types", "cache", "workflow"})
_DEPRECATED_DEFAULTS = ("before_script", "image", "services", "after_script", "cache")
_GLOB = re.compile(r"[*?\[{]")


class _FileIndex:
    def __init__(self, files: ProjectFiles) -> None:
        self.paths = frozenset(files.paths())

    def exists(self, glob: str) -> bool:
        if not _GLOB.search(glob):
            return glob in self.paths
        regex = fnmatch_regex(glob)
        return any(regex.match(p) for p in self.paths)


def _stages(config: Mapping[Any, Any], source: str) -> tuple[str, ...]:
    stages = config.get("stages")
    if stages is None:
        stages = config.get("types")
    if stages is None:
        stages = ["build", "test", "deploy"]
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise ConfigError(f"{source}: stages config should be an array of strings")
    return (*([] if ".pre" in stages else [".pre"]), *stages,
            *([] if ".post" in stages else [".post"]))


def _default(config: Mapping[Any, Any], source: str) -> dict[str, Any]:
    default = config.get("default") or {}
    if not isinstance(default, dict):
        raise ConfigError(f"{source}: default config should be a hash")
    unknown = sorted(map(str, set(default) - set(ci_jobs.DEFAULT_KEYS)))
    if unknown:
        hint = ("; put variables at the top level" if "variables" in unknown else "")
        raise ConfigError(f"{source}: default config contains unknown keys: "
                          f"{', '.join(unknown)}{hint}")
    merged = dict(default)
    for key in _DEPRECATED_DEFAULTS:
        if config.get(key) is not None:
            if default.get(key) is not None:
                raise ConfigError(f"{source}: {key} is defined in top-level and `default:` "
                                  "entry")
            merged[key] = config[key]
    return merged


def _workflow(config: Mapping[Any, Any], source: str,
              ctx: Context) -> tuple[Outcome, list[Variable]]:
    workflow = config.get("workflow") or {}
    if not isinstance(workflow, dict):
        raise ConfigError(f"{source}: workflow config should be a hash")
    unknown = sorted(map(str, set(workflow) - {"rules", "name", "auto_cancel"}))
    if unknown:
        raise ConfigError(f"{source}: workflow config contains unknown keys: "
                          f"{', '.join(unknown)}")
    if workflow.get("rules") is None:
        return Outcome("always", "no workflow:rules"), []
    outcome = evaluate_rules(flatten_rules(workflow["rules"], "workflow:rules"), ctx,
                             default_when="always", where="workflow", workflow=True)
    return outcome, parse_block(outcome.variables, "workflow:rules:variables",
                                source="workflow:rules")


def _instances(config: Mapping[Any, Any], source: str) -> dict[str, Instance]:
    out: dict[str, Instance] = {}
    for key, value in config.items():
        if key in RESERVED:
            continue
        if not isinstance(key, str):
            raise ConfigError(f"{source}: job name {key!r} must be a string: quote it")
        if key.startswith("."):
            continue  # hidden job: a template for extends and !reference
        suffixes = kw.parallel(value.get("parallel") if isinstance(value, dict) else None,
                               f"jobs:{key}:parallel")
        if not suffixes:
            out[key] = Instance(key, key)
        for i, (suffix, matrix) in enumerate(suffixes, start=1):
            name = key + suffix
            out[name] = Instance(key, name, i, len(suffixes), tuple(matrix))
    if not out:
        raise ConfigError(f"{source}: jobs config should contain at least one visible job")
    return out


def load(text: str, *, files: ProjectFiles, predefined: Mapping[str, str],
         cli: Sequence[str] = (), source: str = ".gitlab-ci.yml") -> Pipeline:
    """`predefined`: the pipeline's predefined variables (sources.py); `cli`: KEY=VALUE."""
    try:
        return _load(text, files, predefined, cli, source)
    except Unsupported as e:
        raise CiConfigError(f"unsupported: {e}") from None
    except (ConfigError, RuleError, VariableError) as e:
        raise CiConfigError(str(e)) from None


def _load(text: str, files: ProjectFiles, predefined: Mapping[str, str], cli: Sequence[str],
          source: str) -> Pipeline:
    index = _FileIndex(files)
    pre = [Variable(k, v, source="predefined") for k, v in predefined.items()]
    cli_vars = parse_cli(cli)
    include_vars = as_mapping(collect(pre, cli_vars))
    loaded = load_config(text, source, files, include_vars, index.exists)
    config = loaded.config
    stages = _stages(config, source)
    default = _default(config, source)
    global_vars = parse_block(config.get("variables"), "variables", top_level=True,
                              source="variables")
    ctx = Context(as_mapping(collect(pre, global_vars, cli_vars)), index.exists)
    workflow, workflow_vars = _workflow(config, source, ctx)
    notes = list(loaded.notes) + list(workflow.notes)
    return Pipeline(
        source=source,
        config=config,
        stages=stages,
        default=default,
        global_variables=tuple(global_vars),
        workflow=workflow,
        workflow_variables=tuple(workflow_vars),
        predefined=tuple(pre),
        cli=tuple(cli_vars),
        instances=_instances(config, source),
        file_exists=index.exists,
        included=loaded.included,
        notes=tuple(notes),
    )


def _wrap(p: Pipeline, inst: Instance) -> ResolvedJob:
    try:
        return ci_jobs.resolve(p, inst)
    except Unsupported:
        raise
    except (ConfigError, RuleError, VariableError) as e:
        raise CiConfigError(str(e)) from None


def list_jobs(p: Pipeline) -> list[JobSummary]:
    """Every job GitLab would know (parallel ones by instance), in stage order. A job GitLab
    would reject makes the whole pipeline invalid, as on GitLab."""
    out = []
    for inst in p.instances.values():
        try:
            job = _wrap(p, inst)
        except Unsupported as e:
            stage = p.config[inst.key].get("stage") or "test"
            out.append(JobSummary(inst.name, str(stage), "-", False, "unsupported",
                                  tuple(str(e).splitlines())))
            continue
        out.append(JobSummary(job.name, job.stage, job.when, job.included, job.rules_reason,
                              ()))
    order = {s: i for i, s in enumerate(p.stages)}
    return sorted(out, key=lambda j: order.get(j.stage, len(order)))


def resolve_job(p: Pipeline, name: str) -> ResolvedJob:
    inst = p.instances.get(name)
    if inst is None:
        parallel = [i.name for i in p.instances.values() if i.key == name]
        if parallel:
            raise CiConfigError(f"job {name!r} runs in parallel; name one of its jobs: "
                                + ", ".join(repr(n) for n in parallel))
        hidden = " (a hidden job: it only serves extends and !reference)" \
            if name.startswith(".") and name in p.config else ""
        raise CiConfigError(f"no job {name!r} in {p.source}{hidden}; jobs: "
                            + ", ".join(p.instances))
    # Every job must be valid, as GitLab refuses a pipeline with one invalid job.
    for other in p.instances.values():
        if other is not inst:
            with contextlib.suppress(Unsupported):
                _wrap(p, other)
    try:
        return _wrap(p, inst)
    except Unsupported as e:
        raise CiConfigError(f"job {name!r} uses what nspawn-runner exec does not support:\n"
                            + "\n".join(f"  {line}" for line in str(e).splitlines())) from None


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def preview(job: ResolvedJob) -> str:
    """The job as resolved, in YAML: extends, references, defaults and rules applied;
    variables as GitLab sends them to the runner (predefined ones left out)."""
    own: dict[str, Any] = {}
    for v in job.variables:
        if v.source != "predefined":
            own[v.key] = {"value": v.value, "expand": False} if v.raw else v.value
    body: dict[str, Any] = {"stage": job.stage}
    if job.image is not None:
        body["image"] = job.image
    if own:
        body["variables"] = own
    for key, commands in (("before_script", job.before_script), ("script", job.script),
                          ("after_script", job.after_script)):
        if commands:
            body[key] = list(commands)
    body["when"] = job.when
    body["rules"] = job.rules_reason
    if job.allow_failure.allowed or job.allow_failure.exit_codes:
        body["allow_failure"] = ({"exit_codes": list(job.allow_failure.exit_codes)}
                                 if job.allow_failure.exit_codes else True)
    if job.timeout is not None:
        body["timeout"] = f"{job.timeout_text} ({job.timeout} s)"
    if job.caches:
        body["cache"] = [{"key": c.key, "paths": list(c.paths), "policy": c.policy,
                          "when": c.when,
                          **({"fallback_keys": list(c.fallback_keys)} if c.fallback_keys
                             else {})} for c in job.caches]
    if job.artifacts:
        a = job.artifacts
        body["artifacts"] = {"paths": list(a.paths), "when": a.when,
                             **({"exclude": list(a.exclude)} if a.exclude else {}),
                             **({"name": a.name} if a.name else {})}
    if job.environment:
        body["environment"] = {"name": job.environment.name,
                               **({"url": job.environment.url} if job.environment.url else {})}
    if job.notes:
        body["notes"] = list(job.notes)
    return yaml.dump({job.name: body}, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False, width=100)
