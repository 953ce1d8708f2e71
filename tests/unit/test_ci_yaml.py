"""The .gitlab-ci.yml resolver of `nspawn-runner exec` against GitLab's documented and coded
behaviour: includes, extends, anchors, !reference, defaults, variables, rules, keywords."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from nspawn_runner.errors import CiConfigError
from nspawn_runner.local import ci_yaml
from nspawn_runner.local.ci_duration import parse_seconds
from nspawn_runner.local.ci_expr import ExprSyntaxError, truthful
from nspawn_runner.local.ci_keywords import environment_slug
from nspawn_runner.local.ci_model import Pipeline, ResolvedJob
from nspawn_runner.local.ci_rules import fnmatch_regex

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ci"

BRANCH = {
    "CI": "true", "GITLAB_CI": "true", "CI_COMMIT_BRANCH": "main", "CI_DEFAULT_BRANCH": "main",
    "CI_COMMIT_REF_NAME": "main", "CI_COMMIT_REF_SLUG": "main", "CI_PIPELINE_SOURCE": "push",
    "CI_COMMIT_MESSAGE": "Fix the build", "CI_PROJECT_PATH": "group/webapp",
}
FEATURE = {**BRANCH, "CI_COMMIT_BRANCH": "feature/x", "CI_COMMIT_REF_NAME": "feature/x",
           "CI_COMMIT_REF_SLUG": "feature-x"}


class Files:
    """ProjectFiles from a dict (path → text) or a fixture directory."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    @classmethod
    def directory(cls, root: Path) -> Files:
        return cls({p.relative_to(root).as_posix(): p.read_text()
                    for p in sorted(root.rglob("*")) if p.is_file()})

    def paths(self) -> list[str]:
        return sorted(self.files)

    def read(self, path: str) -> bytes | None:
        text = self.files.get(path)
        return None if text is None else text.encode()


def load(main: str, extra: dict[str, str] | None = None,
         predefined: dict[str, str] | None = None, cli: tuple[str, ...] = ()) -> Pipeline:
    main = textwrap.dedent(main)
    files = Files({".gitlab-ci.yml": main, **{k: textwrap.dedent(v)
                                               for k, v in (extra or {}).items()}})
    return ci_yaml.load(main, files=files, predefined=BRANCH if predefined is None
                        else predefined, cli=cli)


def job(main: str, name: str = "job", **kwargs: object) -> ResolvedJob:
    return ci_yaml.resolve_job(load(main, **kwargs), name)  # type: ignore[arg-type]


def refused(p: Pipeline, name: str) -> str:
    with pytest.raises(CiConfigError) as e:
        ci_yaml.resolve_job(p, name)
    return str(e.value)


def var(j: ResolvedJob, key: str) -> str | None:
    return j.variable(key)


def error(main: str, name: str | None = "job", **kwargs: object) -> str:
    with pytest.raises(CiConfigError) as e:
        p = load(main, **kwargs)  # type: ignore[arg-type]
        if name is not None:
            ci_yaml.resolve_job(p, name)
    return str(e.value)


# ---- the fixture project --------------------------------------------------------------------

def webapp(predefined: dict[str, str] = BRANCH) -> Pipeline:
    files = Files.directory(FIXTURES / "webapp")
    text = (FIXTURES / "webapp" / ".gitlab-ci.yml").read_text()
    return ci_yaml.load(text, files=files, predefined=predefined)


def test_fixture_lists_jobs_in_stage_order_with_parallel_instances() -> None:
    jobs = ci_yaml.list_jobs(webapp())
    assert [j.name for j in jobs] == ["install", "build", "unit 1/3", "unit 2/3", "unit 3/3",
                                      "lint", "deploy", "downstream"]
    assert [j.stage for j in jobs][:2] == ["prepare", "build"]
    downstream = jobs[-1]
    assert downstream.problems and "trigger" in downstream.problems[0]
    assert "pages" not in [j.name for j in jobs]  # ci/jobs/*.yml does not reach deploy/


def test_fixture_build_resolves_extends_references_defaults_and_variables() -> None:
    p = webapp()
    build = ci_yaml.resolve_job(p, "build")
    assert p.included == ("ci/templates.yml", "ci/jobs/deploy.yml", "ci/jobs/test.yml")
    assert build.image == "registry.example.com/ci/node:20"
    # default before_script, itself a !reference with a nested list
    assert build.before_script == ('echo "node $NODE_VERSION"',
                                   'export PATH="$PWD/node_modules/.bin:$PATH"')
    assert build.script == ("npm run build -- $BUILD_FLAGS", "du -sh dist")
    assert build.after_script == ('echo "status $CI_JOB_STATUS"',)
    assert build.timeout == 1200
    # extends: artifacts of .with-artifacts are replaced key by key by the job's own
    assert build.artifacts is not None
    assert build.artifacts.paths == ("dist/",) and build.artifacts.when == "always"
    # the default cache, inherited whole
    assert [(c.key, c.paths, c.policy) for c in build.caches] == [
        ("node-$CI_COMMIT_REF_SLUG", ("node_modules/",), "pull")]
    assert var(build, "BUILD_FLAGS") == "--release"
    assert var(build, "NODE_ENV") == "production"
    assert var(build, "DEPLOY_ENV") == "staging"  # workflow:rules:variables over variables:
    # the runner's own variables stay for the runner to expand; $$ too
    assert var(build, "APP_DIR") == "$CI_PROJECT_DIR/app"
    assert var(build, "LITERAL") == "cost: $$5"
    assert var(build, "CI_JOB_NAME") == "build" and var(build, "CI_JOB_STAGE") == "build"


def test_fixture_install_keeps_its_own_cache_and_anchored_keys() -> None:
    install = ci_yaml.resolve_job(webapp(), "install")
    assert [c.policy for c in install.caches] == ["pull-push"]
    assert "interruptible, retry: no effect in a local run" in install.notes


def test_fixture_parallel_unit_jobs() -> None:
    p = webapp()
    unit = ci_yaml.resolve_job(p, "unit 2/3")
    assert (var(unit, "CI_NODE_INDEX"), var(unit, "CI_NODE_TOTAL")) == ("2", "3")
    assert var(unit, "NODE_ENV") == "test"
    assert unit.allow_failure.permits(3) and not unit.allow_failure.permits(1)
    assert "name one of its jobs: 'unit 1/3', 'unit 2/3', 'unit 3/3'" in refused(p, "unit")


def test_fixture_lint_inherit_and_exists_rule() -> None:
    lint = ci_yaml.resolve_job(webapp(), "lint")
    assert lint.image == "registry.example.com/ci/node:20"
    assert lint.before_script == () and lint.caches == ()  # inherit:default: [image]
    assert var(lint, "NODE_VERSION") == "20" and var(lint, "DEPLOY_ENV") is None
    assert lint.included and lint.allow_failure.allowed
    assert lint.rules_reason.startswith("rule 2")
    skipped = ci_yaml.resolve_job(webapp({**BRANCH, "CI_COMMIT_MESSAGE": "wip [Skip Lint]"}),
                                  "lint")
    assert not skipped.included and skipped.when == "never"


def test_fixture_deploy_environment_and_rules() -> None:
    deploy = ci_yaml.resolve_job(webapp(), "deploy")
    assert deploy.included and deploy.when == "on_success"
    assert deploy.environment is not None and deploy.environment.name == "staging/main"
    assert var(deploy, "CI_ENVIRONMENT_URL") == "https://main.example.com"
    assert var(deploy, "CI_ENVIRONMENT_TIER") == "staging"
    assert any("entrypoint has no effect" in n for n in deploy.notes)
    tag = {**BRANCH, "CI_COMMIT_TAG": "v1.0", "CI_COMMIT_REF_NAME": "v1.0"}
    del tag["CI_COMMIT_BRANCH"]
    release = ci_yaml.resolve_job(webapp(tag), "deploy")
    assert release.when == "manual" and not release.allow_failure.allowed  # manual by rules
    assert var(release, "CI_JOB_MANUAL") == "true"
    feature = ci_yaml.resolve_job(webapp(FEATURE), "deploy")
    assert not feature.included and feature.rules_reason == "rule 3 matched: when never"


def test_fixture_unsupported_job_is_refused_by_keyword_others_run() -> None:
    p = webapp()
    message = refused(p, "downstream")
    assert "jobs:downstream:trigger" in message and "GitLab server" in message
    assert ci_yaml.resolve_job(p, "build").name == "build"


def test_fixture_preview_is_yaml_of_the_resolved_job() -> None:
    build = ci_yaml.resolve_job(webapp(), "build")
    shown = yaml.safe_load(ci_yaml.preview(build))["build"]
    assert shown["script"] == ["npm run build -- $BUILD_FLAGS", "du -sh dist"]
    assert shown["variables"]["NODE_ENV"] == "production"
    assert "CI_COMMIT_BRANCH" not in shown["variables"]  # predefined ones are left out
    assert shown["timeout"] == "20 minutes (1200 s)"
    assert shown["cache"][0]["key"] == "node-$CI_COMMIT_REF_SLUG"


def test_workflow_rules_exclude_the_pipeline() -> None:
    p = webapp({**BRANCH, "CI_COMMIT_BRANCH": "", "CI_PIPELINE_SOURCE": "schedule"})
    build = ci_yaml.resolve_job(p, "build")
    assert not build.included and build.rules_reason.startswith("workflow:")


# ---- YAML ------------------------------------------------------------------------------------

def test_invalid_yaml_names_file_line_and_column() -> None:
    message = error("job:\n  script: [echo\n", None)
    assert message.startswith(".gitlab-ci.yml: invalid YAML:") and "line 3" in message


def test_empty_and_non_mapping_files() -> None:
    assert "Please provide content" in error("\n", None)
    assert "Invalid configuration format" in error("- a\n- b\n", None)


def test_dates_must_be_quoted() -> None:
    assert "quote it" in error("variables:\n  DAY: 2024-01-31\njob: {script: x}\n", None)


def test_unknown_tags_keep_their_value_like_psych() -> None:
    assert job("job:\n  script: !custom echo hi\n").script == ("echo hi",)


def test_anchors_and_merge_keys_replace_not_merge() -> None:
    j = job("""
        .vars: &vars
          variables: {A: a, B: b}
          script: [echo base]
        job:
          <<: *vars
          variables: {A: own}
        """)
    assert var(j, "A") == "own" and var(j, "B") is None  # a merge key is shallow
    assert j.script == ("echo base",)


def test_anchors_do_not_cross_included_files() -> None:
    message = error("include: other.yml\njob:\n  <<: *tmpl\n", None,
                    extra={"other.yml": ".t: &tmpl\n  script: [x]\n"})
    assert "invalid YAML" in message and "tmpl" in message


def test_spec_header_is_refused_by_name() -> None:
    assert "spec:inputs" in error("spec:\n  inputs: {a: {}}\n---\njob: {script: x}\n", None)


# ---- include ---------------------------------------------------------------------------------

def test_include_forms_and_merge_order() -> None:
    j = job("""
        include:
          - /ci/a.yml
          - local: ci/b.yml
        variables: {FROM_MAIN: main, SHARED: main}
        job: {script: [echo main], variables: {J: main}}
        """, extra={
        "ci/a.yml": "variables: {SHARED: a, A: a}\njob: {image: a, variables: {J: a, JA: a}}\n",
        "ci/b.yml": "variables: {SHARED: b}\njob: {image: b}\n",
    })
    # included files deep-merged in order, the including file on top
    assert var(j, "SHARED") == "main" and var(j, "A") == "a" and j.image == "b"
    assert var(j, "J") == "main" and var(j, "JA") == "a"


def test_string_include() -> None:
    assert job("include: 'ci/x.yml'\n", extra={"ci/x.yml": "job: {script: [x]}\n"}).script == (
        "x",)


def test_nested_includes_are_relative_to_the_project_root() -> None:
    j = job("include: ci/a.yml\n", extra={"ci/a.yml": "include: ci/b.yml\n",
                                          "ci/b.yml": "job: {script: [deep]}\n"})
    assert j.script == ("deep",)


def test_include_wildcards() -> None:
    extra = {"ci/a.yml": "a: {script: [a]}\n", "ci/b.yaml": "b: {script: [b]}\n",
             "ci/sub/c.yml": "c: {script: [c]}\n", "ci/README.md": "x"}
    one = load("include: 'ci/*.yml'\n", extra=extra)
    assert sorted(one.instances) == ["a"]
    deep = load("include: 'ci/**.y*ml'\n", extra=extra)
    assert sorted(deep.instances) == ["a", "b", "c"]
    sub = load("include: 'ci/**/*.yml'\n", extra=extra)
    assert sorted(sub.instances) == ["c"]


def test_wildcard_matching_nothing_is_noted() -> None:
    p = load("include: 'nothing/*.yml'\njob: {script: [x]}\n")
    assert any("matches no file" in n for n in p.notes)


def test_include_with_variables_and_rules() -> None:
    extra = {"ci/main.yml": "job: {script: [on-main]}\n",
             "ci/other.yml": "job: {script: [elsewhere]}\n"}
    main = """
        include:
          - local: ci/$CI_COMMIT_BRANCH.yml
            rules:
              - if: $CI_COMMIT_BRANCH == "main"
          - local: ci/other.yml
            rules:
              - if: $CI_COMMIT_BRANCH != "main"
        """
    assert job(main, extra=extra).script == ("on-main",)
    assert job(main, extra=extra, predefined=FEATURE).script == ("elsewhere",)


def test_include_errors() -> None:
    assert "Local file `ci/none.yml` does not exist!" in error("include: ci/none.yml\n", None)
    assert "does not have YAML extension" in error("include: ci/x.txt\n", None,
                                                   extra={"ci/x.txt": "a: b"})
    assert "is empty" in error("include: e.yml\n", None, extra={"e.yml": "\n"})
    assert "Maximum of 150 nested includes" in error("include: loop.yml\n", None,
                                                    extra={"loop.yml": "include: loop.yml\n"})


@pytest.mark.parametrize("include, kind", [
    ("https://example.com/ci.yml", "remote"),
    ("{remote: 'https://example.com/ci.yml'}", "remote"),
    ("{template: Auto-DevOps.gitlab-ci.yml}", "template"),
    ("{project: group/ci, file: /t.yml}", "project"),
    ("{component: $CI_SERVER_FQDN/group/c/c@1.0}", "component"),
])
def test_includes_needing_a_server_are_refused_by_name(include: str, kind: str) -> None:
    message = error(f"include: {include}\njob: {{script: [x]}}\n", None)
    assert message.startswith("unsupported:") and f"include:{kind}" in message


# ---- extends ---------------------------------------------------------------------------------

def test_extends_multi_level_list_and_deep_merge() -> None:
    j = job("""
        .a: {variables: {A: a, SHARED: a}, script: [a], cache: {paths: [a/], key: a}}
        .b: {extends: .a, variables: {B: b, SHARED: b}, artifacts: {paths: [b/]}}
        .c: {variables: {SHARED: c, C: c}, script: [c1, c2]}
        job:
          extends: [.b, .c]
          variables: {J: j}
          cache: {key: own}
        """)
    assert (var(j, "A"), var(j, "B"), var(j, "C"), var(j, "J")) == ("a", "b", "c", "j")
    assert var(j, "SHARED") == "c"  # later in the list wins
    assert j.script == ("c1", "c2")  # arrays are replaced, not appended
    assert [(c.key, c.paths) for c in j.caches] == [("own", ("a/",))]  # hashes merge
    assert j.artifacts is not None and j.artifacts.paths == ("b/",)


def test_extends_errors() -> None:
    assert "job: unknown keys in `extends` (.none)" in error(
        "job: {extends: .none, script: [x]}\n")
    assert "circular dependency detected in `extends`" in error(
        ".a: {extends: .b}\n.b: {extends: .a}\njob: {extends: .a, script: [x]}\n")
    assert "invalid base hashes in `extends` (.s)" in error(
        ".s: [x]\njob: {extends: .s, script: [x]}\n")
    chain = "".join(f".l{i}: {{extends: .l{i + 1}}}\n" for i in range(12)) + ".l12: {}\n"
    assert "nesting too deep in `extends`" in error(chain + "job: {extends: .l0, script: [x]}\n")


# ---- !reference ------------------------------------------------------------------------------

def test_references_in_scripts_variables_and_nested() -> None:
    j = job("""
        .setup:
          script: [one, [two]]
          variables: {R: r}
        .more:
          script: [!reference [.setup, script], three]
        job:
          variables: !reference [.setup, variables]
          before_script: [!reference [.more, script]]
          script: [!reference [.setup, script], four]
        """)
    assert j.before_script == ("one", "two", "three")
    assert j.script == ("one", "two", "four")
    assert var(j, "R") == "r"


def test_references_see_the_extended_configuration() -> None:
    j = job("""
        .base: {script: [from-base]}
        .child: {extends: .base}
        job: {script: [!reference [.child, script]]}
        """)
    assert j.script == ("from-base",)


def test_reference_errors() -> None:
    assert '!reference [".none", "script"] could not be found' in error(
        "job: {script: [!reference [.none, script]]}\n")
    assert "part of a circular chain" in error(
        ".a: {script: !reference [.b, script]}\n.b: {script: !reference [.a, script]}\n"
        "job: {script: [x]}\n")
    assert "is not valid" in error("job: {script: !reference .a}\n")
    assert "could not be found" in error(  # a false value counts as missing, as in GitLab
        ".a: {allow_failure: false}\njob: {script: [x], allow_failure: !reference [.a, "
        "allow_failure]}\n")


# ---- default / inherit -----------------------------------------------------------------------

def test_default_keys_are_replaced_whole_not_merged() -> None:
    j = job("""
        default:
          artifacts: {paths: [default/], when: always}
          timeout: 2h
        job: {script: [x], artifacts: {paths: [own/]}}
        """)
    assert j.artifacts is not None and (j.artifacts.paths, j.artifacts.when) == (
        ("own/",), "on_success")
    assert j.timeout == 7200


def test_top_level_defaults_and_conflicts() -> None:
    assert job("image: old-style\njob: {script: [x]}\n").image == "old-style"
    assert "image is defined in top-level and `default:` entry" in error(
        "image: a\ndefault: {image: b}\njob: {script: [x]}\n", None)
    assert "put variables at the top level" in error(
        "default: {variables: {A: a}}\njob: {script: [x]}\n", None)


def test_inherit_default_and_variables() -> None:
    main = """
        variables: {A: a, B: b}
        default: {image: img, before_script: [setup]}
        none: {script: [x], inherit: {default: false, variables: false}}
        some: {script: [x], inherit: {default: [before_script], variables: [B]}}
        """
    none = job(main, "none")
    assert none.image is None and none.before_script == ()
    assert var(none, "A") is None and var(none, "B") is None
    some = job(main, "some")
    assert some.image is None and some.before_script == ("setup",)
    assert var(some, "A") is None and var(some, "B") == "b"
    assert "unknown values: variables" in error(
        "job: {script: [x], inherit: {default: [variables]}}\n")


# ---- variables -------------------------------------------------------------------------------

PRECEDENCE = """
    variables: {V: global, G: global}
    workflow:
      rules:
        - variables: {V: workflow, W: workflow}
    job:
      script: [x]
      variables: {V: job, CI_COMMIT_BRANCH: overridden}
      rules:
        - if: $V == "job"
          variables: {R: rule}
"""


def test_variable_precedence() -> None:
    j = job(PRECEDENCE)
    assert var(j, "V") == "job" and var(j, "W") == "workflow" and var(j, "G") == "global"
    assert var(j, "R") == "rule"
    assert var(j, "CI_COMMIT_BRANCH") == "overridden"  # predefined variables are the lowest
    assert var(job(PRECEDENCE, cli=("V=cli", "R=cli")), "V") == "cli"
    assert var(job(PRECEDENCE, cli=("V=cli", "R=cli")), "R") == "cli"


def test_rules_variables_over_job_variables() -> None:
    j = job("job: {script: [x], variables: {V: job}, rules: [{variables: {V: rule}}]}\n")
    assert var(j, "V") == "rule"


def test_expansion_as_the_server_does_it() -> None:
    j = job("""
        variables:
          BASE: base
          LEVEL1: "$BASE/1"
          LEVEL2: "${LEVEL1}/2"
          WINDOWS: "%BASE%"
          RUNNER: "$CI_PROJECT_DIR/x"
          ESCAPED: "$$BASE"
          RAW: {value: "$BASE", expand: false}
          USES_RAW: "$RAW/y"
        job: {script: [x]}
        """)
    assert var(j, "LEVEL2") == "base/1/2"  # recursive, in dependency order
    assert var(j, "WINDOWS") == "base"
    assert var(j, "RUNNER") == "$CI_PROJECT_DIR/x"  # unknown here: the runner expands it
    assert var(j, "ESCAPED") == "$$BASE"  # the runner turns $$ into $
    assert var(j, "RAW") == "$BASE" and [v.raw for v in j.variables if v.key == "RAW"] == [True]
    assert var(j, "USES_RAW") == "$RAW/y"  # references to raw variables are the runner's


def test_circular_variables() -> None:
    assert "circular variable reference detected: A, B" in error(
        "variables: {A: $B, B: $A}\njob: {script: [x]}\n")


def test_variable_values_as_gitlab_converts_them() -> None:
    j = job("variables: {I: 1, F: 1.5, E: 1.0e+20, T: true, O: 010}\njob: {script: [x]}\n")
    assert [var(j, k) for k in "IFETO"] == ["1", "1.5", "1.0e+20", "true", "8"]


@pytest.mark.parametrize("block, message", [
    ("variables: {A: null}", "must be either a string or a hash"),
    ("variables: {A: [1]}", "must be either a string or a hash"),
    ("variables: {A: {value: x, bogus: 1}}", "invalid data keys: bogus"),
    ("variables: {A: {value: b, options: [a, c]}}", "value must be present in options"),
    ("variables: [A]", "should be a hash of key value pairs"),
])
def test_invalid_top_level_variables(block: str, message: str) -> None:
    assert message in error(block + "\njob: {script: [x]}\n", None)


def test_job_variables_take_no_description() -> None:
    assert "invalid data keys: description" in error(
        "job: {script: [x], variables: {A: {value: a, description: d}}}\n")


def test_cli_variables_must_be_key_value() -> None:
    assert "--var KEY=VALUE" in error("job: {script: [x]}\n", None, cli=("novalue",))


# ---- expressions -----------------------------------------------------------------------------

V = {"BRANCH": "main", "EMPTY": "", "SPACE": "  ", "PATTERN": "/^ma/", "TEXT": "Feature"}


@pytest.mark.parametrize("expression, expected", [
    ('$BRANCH == "main"', True),
    ("$BRANCH == 'main'", True),
    ('$BRANCH != "main"', False),
    ("$UNDEFINED == null", True),
    ('$EMPTY == null', False),
    ('$EMPTY == ""', True),
    ("$BRANCH", True),
    ("$EMPTY", False),
    ("$SPACE", False),
    ("$UNDEFINED", False),
    ("$BRANCH =~ /^ma/", True),
    ("$TEXT =~ /^feat/", False),
    ("$TEXT =~ /^feat/i", True),
    ("$BRANCH =~ $PATTERN", True),  # a variable holding /regex/
    ('$BRANCH =~ "the main one"', True),  # a plain string: is the text inside it?
    ("$BRANCH !~ /^rel/", True),
    ("$BRANCH =~ $UNDEFINED", False),
    ("$BRANCH !~ $UNDEFINED", True),
    ("$UNDEFINED =~ /^$/", True),  # nil.to_s is ""
    ('$BRANCH == "x" || $BRANCH == "main" && $TEXT', True),
    ('($BRANCH == "x" || $BRANCH == "main") && $EMPTY', False),
    ("$EMPTY && $BRANCH", True),  # Ruby: "" is true for &&
    ("$EMPTY || $BRANCH", False),  # ... and || returns it
    ('$BRANCH =~ /a\\/b/ || $BRANCH =~ /in$/', True),
])
def test_expressions(expression: str, expected: bool) -> None:
    assert truthful(expression, V) is expected


@pytest.mark.parametrize("expression", [
    "$A = 1", "${BRANCH} == 'x'", "$A == /ab/x", '$A == "x" &&', "($A", "$A $B", "/a/",
    "$A =~ /(?=x)y/", "",
])
def test_expression_syntax_errors(expression: str) -> None:
    with pytest.raises(ExprSyntaxError):
        truthful(expression, V)


def test_invalid_rule_expression_is_a_configuration_error() -> None:
    message = error('job: {script: [x], rules: [{if: "$A = 1"}]}\n')
    assert "jobs:job:rules:0 if: invalid expression syntax" in message


# ---- rules / only / except -------------------------------------------------------------------

def test_first_matching_rule_wins_and_no_match_excludes() -> None:
    main = """
        job:
          script: [x]
          rules:
            - if: $CI_COMMIT_BRANCH == "release"
              when: never
            - if: $CI_COMMIT_BRANCH =~ /^feature/
              when: manual
              allow_failure: false
        """
    assert not job(main).included
    feature = job(main, predefined=FEATURE)
    assert feature.included and feature.when == "manual"


def test_rule_with_only_when_always_matches() -> None:
    assert job("job: {script: [x], rules: [{when: always}]}\n").when == "always"


def test_rules_changes_hold_with_a_note() -> None:
    j = job("job: {script: [x], rules: [{changes: [src/**/*]}]}\n")
    assert j.included and any("changes: treated as true" in n for n in j.notes)


def test_rules_exists() -> None:
    main = "job: {script: [x], rules: [{exists: ['docs/**/*.md']}]}\n"
    assert job(main, extra={"docs/a/b.md": "x"}).included
    assert not job(main, extra={"docs/a/b.txt": "x"}).included


def test_rules_cannot_mix_with_only() -> None:
    assert "may not be used with `rules`: only" in error(
        "job: {script: [x], rules: [{when: always}], only: [main]}\n")


def test_only_except() -> None:
    assert job("job: {script: [x], only: [main]}\n").included
    assert not job("job: {script: [x], only: [main]}\n", predefined=FEATURE).included
    assert job("job: {script: [x], only: ['/^feature\\//']}\n", predefined=FEATURE).included
    assert not job("job: {script: [x], except: [branches]}\n").included
    assert job("job: {script: [x], only: [pushes]}\n").included
    assert not job("job: {script: [x], only: {refs: [main], variables: [$NOPE]}}\n").included
    assert not job("job: {script: [x], except: {refs: [other], variables: ['$CI']}}\n").included
    assert not job("job: {script: [x], only: [tags]}\n").included


def test_manual_job_allows_failure_unless_rules_made_it_manual() -> None:
    assert job("job: {script: [x], when: manual}\n").allow_failure.allowed
    assert not job("job: {script: [x], rules: [{when: manual}]}\n").allow_failure.allowed


# ---- jobs and keywords ---------------------------------------------------------------------

def test_hidden_jobs_and_reserved_keys_are_not_jobs() -> None:
    p = load("""
        stages: [test]
        variables: {A: a}
        workflow: {rules: [{when: always}]}
        .hidden: {script: [x]}
        job: {script: [x]}
        """)
    assert list(p.instances) == ["job"]
    assert "a hidden job" in refused(p, ".hidden")
    assert "no job 'nope'" in refused(p, "nope")


def test_no_visible_job() -> None:
    assert "at least one visible job" in error(".only-hidden: {script: [x]}\n", None)


def test_job_structure_errors() -> None:
    assert "config contains unknown keys: scirpt" in error("job: {scirpt: [x]}\n")
    assert "should implement the script:, run:, or trigger: keyword" in error(
        "job: {image: x}\n")
    assert "config should be a hash" in error("job: [x]\n")
    assert "chosen stage deploy2 does not exist" in error("job: {script: [x], stage: deploy2}\n")
    assert "script can't be blank" in error("job: {script: []}\n")
    assert "nested array of strings" in error("job: {script: [1]}\n")


def test_an_invalid_job_invalidates_the_pipeline() -> None:
    assert "jobs:bad config contains unknown keys" in error(
        "job: {script: [x]}\nbad: {script: [x], nope: 1}\n")


def test_stages_get_pre_and_post() -> None:
    p = load("stages: [build]\njob: {script: [x], stage: .pre}\n")
    assert p.stages == (".pre", "build", ".post")
    assert ci_yaml.resolve_job(p, "job").stage == ".pre"
    assert job("job: {script: [x]}\n").stage == "test"


@pytest.mark.parametrize("keyword, value", [
    ("trigger", "group/project"),
    ("services", "[postgres:15]"),
    ("release", "{tag_name: v1, description: d}"),
    ("secrets", "{S: {vault: a/b@c}}"),
    ("id_tokens", "{T: {aud: x}}"),
    ("hooks", "{pre_get_sources_script: [x]}"),
])
def test_unsupported_keywords_are_reported_by_name(keyword: str, value: str) -> None:
    message = error(f"job: {{script: [x], {keyword}: {value}}}\n")
    assert f"jobs:job:{keyword}" in message and "does not support" in message


def test_all_unsupported_keywords_of_a_job_at_once() -> None:
    message = error("job: {script: [x], services: [db], release: {tag_name: v}}\n")
    assert "jobs:job:release" in message and "jobs:job:services" in message


def test_default_services_make_jobs_unsupported_unless_not_inherited() -> None:
    main = "default: {services: [db]}\njob: {script: [x]}\nfree: {script: [x], inherit: " \
           "{default: false}}\n"
    assert "services" in error(main)
    assert job(main, "free").script == ("x",)


def test_image_forms() -> None:
    assert job("job: {script: [x], image: {name: 'reg/img:1'}}\n").image == "reg/img:1"
    assert "docker executor" in error("job: {script: [x], image: {name: a, docker: {user: "
                                      "root}}}\n")


@pytest.mark.parametrize("value, allowed, codes", [
    ("true", True, ()), ("false", False, ()), ("{exit_codes: 7}", False, (7,)),
    ("{exit_codes: [1, 137]}", False, (1, 137)),
])
def test_allow_failure(value: str, allowed: bool, codes: tuple[int, ...]) -> None:
    result = job(f"job: {{script: [x], allow_failure: {value}}}\n").allow_failure
    assert (result.allowed, result.exit_codes) == (allowed, codes)


def test_allow_failure_errors() -> None:
    assert "exit_codes should be an integer" in error(
        "job: {script: [x], allow_failure: {exit_codes: [a]}}\n")
    assert "hash or a boolean" in error("job: {script: [x], allow_failure: maybe}\n")


@pytest.mark.parametrize("text, seconds", [
    ("1h 30m", 5400), ("90 minutes", 5400), ("3 hours and 20 minutes", 12000),
    ("1:30:00", 5400), ("2.5 hrs", 9000), ("1 day", 86400), ("1h 30", 5400),
    ("1 week", 604800), ("3600", 3600),
])
def test_timeout(text: str, seconds: int) -> None:
    assert job(f"job: {{script: [x], timeout: '{text}'}}\n").timeout == seconds


@pytest.mark.parametrize("value", ["'soon'", "'0'", "3600", "'2 months'"])
def test_timeout_errors(value: str) -> None:
    assert "jobs:job:timeout" in error(f"job: {{script: [x], timeout: {value}}}\n")


def test_chronic_duration_exemplars() -> None:
    # From GitLab's chronic_duration_spec.rb
    for text, expected in {"1:20": 80, "1:20.51": 80.51, "4:01:01": 14461, "3 mins 4 sec": 184,
                           "2h20min": 8400, "6 mos 1 day": 15638400, "2.5 hrs": 9000,
                           "47 yrs 6 mos and 4.5d": 47 * 31557600 + 6 * 30 * 86400 + 4.5 * 86400,
                           "3 weeks and, 2 days": 1987200, "day": 86400,
                           "minute 30s": 90}.items():
        assert parse_seconds(text) == pytest.approx(expected), text
    assert parse_seconds("gobblygoo") is None and parse_seconds("0") is None


def test_caches() -> None:
    j = job("""
        job:
          script: [x]
          cache:
            - {key: one, paths: [a/], policy: pull, when: always, fallback_keys: [main]}
            - {paths: [b/]}
            - {key: no-paths}
        """)
    assert [(c.key, c.policy, c.when, c.fallback_keys) for c in j.caches] == [
        ("one", "pull", "always", ("main",)), ("default", "pull-push", "on_success", ())]


@pytest.mark.parametrize("cache, message", [
    ("{key: a/b, paths: [x]}", 'cannot contain the "/" character'),
    ("{key: .., paths: [x]}", 'cannot be "." or ".."'),
    ("{paths: [x], policy: sometimes}", "should be a variable or one of"),
    ("{paths: [x], when: never}", "when should be one of"),
    ("{paths: [x], bogus: 1}", "unknown keys: bogus"),
    ("[{paths: [a]}, {paths: [b]}, {paths: [c]}, {paths: [d]}, {paths: [e]}]",
     "no more than 4 caches"),
])
def test_cache_errors(cache: str, message: str) -> None:
    assert message in error(f"job: {{script: [x], cache: {cache}}}\n")


def test_cache_key_files_and_untracked_are_unsupported() -> None:
    assert "cache:key:files" in error("job: {script: [x], cache: {key: {files: [a]}, paths: "
                                      "[x]}}\n")
    assert "cache:untracked" in error("job: {script: [x], cache: {untracked: true}}\n")


def test_artifacts() -> None:
    j = job("job: {script: [x], artifacts: {paths: [out/], exclude: ['out/**/*.o'], when: "
            "on_failure, name: $CI_JOB_NAME, reports: {junit: r.xml}}}\n")
    assert j.artifacts is not None
    assert (j.artifacts.paths, j.artifacts.exclude, j.artifacts.when, j.artifacts.name) == (
        ("out/",), ("out/**/*.o",), "on_failure", "$CI_JOB_NAME")
    assert any("reports (junit) are not collected" in n for n in j.notes)
    assert "artifacts:untracked" in error("job: {script: [x], artifacts: {untracked: true}}\n")
    assert "when should be one of" in error("job: {script: [x], artifacts: {paths: [a], when: "
                                            "never}}\n")


def test_parallel_matrix() -> None:
    p = load("""
        job:
          script: [x]
          parallel:
            matrix:
              - {PROVIDER: aws, STACK: [monitoring, app1]}
              - {PROVIDER: [ovh, gcp], STACK: app2}
        """)
    assert list(p.instances) == ["job: [aws, monitoring]", "job: [aws, app1]",
                                 "job: [ovh, app2]", "job: [gcp, app2]"]
    j = ci_yaml.resolve_job(p, "job: [gcp, app2]")
    assert (var(j, "PROVIDER"), var(j, "STACK"), var(j, "CI_NODE_INDEX"),
            var(j, "CI_NODE_TOTAL")) == ("gcp", "app2", "4", "4")
    assert "integer from 1 to 200" in error("job: {script: [x], parallel: 201}\n", None)


def test_environment_slug() -> None:
    # GitLab's spec, with the digest stubbed as 'a' * 64 (its base-36 tail is q517sa)
    for name, slug in {"staging-12345678901234567": "staging-123456789-q517sa",
                       "9-staging-123456789012345": "env-9-staging-123-q517sa",
                       "staging-1234567890123456": "staging-1234567890123456",
                       "production": "production", "PRODUCTION": "production-q517sa",
                       "review/1-foo": "review-1-foo-q517sa", "foo-": "foo",
                       "foo--bar": "foo-bar-q517sa", "": "env-q517sa"}.items():
        assert environment_slug(name, "a" * 64) == slug, name


def test_needs_and_dependencies() -> None:
    main = """
        stages: [build, test, deploy]
        build: {stage: build, script: [x], parallel: 2}
        other: {stage: build, script: [x]}
        test: {script: [x]}
        needs: {stage: deploy, script: [x], needs: [build, {job: opt, optional: true},
                                                  {job: test, artifacts: false}]}
        deps: {stage: deploy, script: [x], dependencies: [other]}
        all: {stage: deploy, script: [x]}
        """
    assert job(main, "needs").dependencies == ("build 1/2", "build 2/2")
    assert job(main, "deps").dependencies == ("other",)
    assert job(main, "all").dependencies == ("build 1/2", "build 2/2", "other", "test")
    assert job(main, "build 1/2").dependencies == ()
    assert "'job' job needs 'nope' job" in error("job: {script: [x], needs: [nope]}\n")
    assert "needs:pipeline" in error("job: {script: [x], needs: [{pipeline: $ID, job: a}]}\n")
    assert "undefined dependency: nope" in error("job: {script: [x], dependencies: [nope]}\n")


def test_globs_like_ruby_fnmatch() -> None:
    cases = [("*.py", "a.py", True), ("*.py", "d/a.py", False), ("**/*.py", "a.py", True),
             ("**/*.py", "d/e/a.py", True), (".*", ".hidden", True), ("{a,b}.txt", "b.txt", True),
             ("[!ab].c", "c.c", True), ("[!ab].c", "a.c", False), ("src/**", "src/a/b", False)]
    for glob, path, expected in cases:
        assert bool(fnmatch_regex(glob).match(path)) is expected, (glob, path)
