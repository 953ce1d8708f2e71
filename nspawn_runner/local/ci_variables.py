"""CI/CD variables as GitLab builds them for a job.

Precedence, lowest first (GitLab's documented order, less what needs a server): predefined
variables, top-level `variables:` (filtered by `inherit:variables`), `workflow:rules:variables`,
the job's `variables:` (and its `parallel:matrix` values), the matched rule's `variables:`,
then pipeline variables (`--var KEY=VALUE`).

Expansion happens in two places, as in GitLab. The server (`server_expand`) expands values
recursively in dependency order, keeps references it cannot resolve (`$CI_PROJECT_DIR` is the
runner's) and `$$`, and leaves references to `expand: false` variables for the runner. The
runner then expands each value once more with its own variables and turns `$$` into `$`; in
this project that is the gitlab-runner emulation's job."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# GitLab's Collection::Item::VARIABLES_REGEXP: `$$` and `%%` are escapes, kept as they are.
_REFERENCE = re.compile(
    r"\$\$|%%|\$(?P<a>[A-Za-z_][A-Za-z0-9_]*)|\$\{(?P<b>[A-Za-z_][A-Za-z0-9_]*)?\}"
    r"|%(?P<c>[A-Za-z_][A-Za-z0-9_]*)%")


class VariableError(ValueError):
    """A variables block GitLab would reject, or a circular reference."""


@dataclass(frozen=True)
class Variable:
    key: str
    value: str
    raw: bool = False  # `expand: false`: no expansion, neither by the server nor the runner
    source: str = ""  # "predefined", "variables", "workflow:rules", "job", "rules", "--var"
    description: str | None = None


def ruby_to_s(value: object) -> str:
    """A YAML scalar as GitLab's Ruby turns it into a string (`true`, `1.0`, `1.0e+20`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        text = repr(value)
        if "e" in text:
            mantissa, exponent = text.split("e")
            if "." not in mantissa:
                mantissa += ".0"
            return f"{mantissa}e{exponent}"
        return text
    return str(value)


def _scalar(value: object) -> bool:
    return isinstance(value, str | int | float)  # bool is an int


def parse_block(data: object, where: str, *, top_level: bool = False,
                source: str = "job") -> list[Variable]:
    """A `variables:` mapping. Top-level entries may be `{value, description, expand,
    options}`; job-level ones `{value, expand}`; rules-level ones plain values only."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise VariableError(f"{where} config should be a hash of key value pairs")
    allowed = ({"value", "description", "expand", "options"} if top_level
               else {"value", "expand"} if source == "job" else set())
    out: list[Variable] = []
    for key, value in data.items():
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise VariableError(f"{where}: variable name {key!r} must be an alphanumeric string")
        name = str(key)
        if _scalar(value):
            out.append(Variable(name, ruby_to_s(value), source=source))
            continue
        if not isinstance(value, dict):
            raise VariableError(
                f"{where}:{name}: variable definition must be either a string or a hash "
                f"(got {ruby_to_s(value) if value is not None else 'null'}); quote the value")
        extra = sorted(set(value) - allowed)
        if not allowed:
            raise VariableError(f"{where}:{name} config must be a string")
        if extra:
            raise VariableError(f"{where}:{name} config uses invalid data keys: "
                                f"{', '.join(map(str, extra))}")
        raw_value = value.get("value")
        if raw_value is not None and not _scalar(raw_value):
            raise VariableError(f"{where}:{name}:value must be a scalar")
        expand = value.get("expand")
        if expand is not None and not isinstance(expand, bool):
            raise VariableError(f"{where}:{name}:expand should be a boolean value")
        options = value.get("options")
        if options is not None:
            if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                raise VariableError(f"{where}:{name}:options should be an array of strings")
            if ruby_to_s(raw_value) not in options:
                raise VariableError(f"{where}:{name} config value must be present in options")
        description = value.get("description")
        out.append(Variable(name, "" if raw_value is None else ruby_to_s(raw_value),
                            raw=expand is False, source=source,
                            description=str(description) if description is not None else None))
    return out


def parse_cli(pairs: Iterable[str]) -> list[Variable]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise VariableError(f"--var {pair!r}: use --var KEY=VALUE with KEY made of "
                                "letters, digits and underscores")
        out.append(Variable(key, value, source="--var"))
    return out


def collect(*layers: Iterable[Variable]) -> list[Variable]:
    """Later layers win; a key keeps the position of its first definition."""
    merged: dict[str, Variable] = {}
    for layer in layers:
        for variable in layer:
            merged[variable.key] = variable
    return list(merged.values())


def as_mapping(variables: Iterable[Variable]) -> dict[str, str]:
    return {v.key: v.value for v in variables}


def _depends_on(variable: Variable) -> list[str]:
    if variable.raw:
        return []
    return [m.group("a") or m.group("b") or m.group("c") for m in _REFERENCE.finditer(
        variable.value) if m.group("a") or m.group("b") or m.group("c")]


def server_expand(variables: list[Variable], where: str) -> list[Variable]:
    """GitLab's `sort_and_expand_all(keep_undefined: true, expand_raw_refs: false)`."""
    by_key = {v.key: v for v in variables}
    done: dict[str, Variable] = {}
    visiting: list[str] = []

    def expand(variable: Variable) -> Variable:
        if variable.key in done:
            return done[variable.key]
        if variable.key in visiting:
            cycle = visiting[visiting.index(variable.key):]
            raise VariableError(f"{where}: circular variable reference detected: "
                                f"{', '.join(cycle)}; break the cycle")
        visiting.append(variable.key)

        def sub(m: re.Match[str]) -> str:
            name = m.group("a") or m.group("b") or m.group("c")
            if not name or name not in by_key:
                return m.group(0)  # an escape, or the runner's to expand
            target = by_key[name]
            return m.group(0) if target.raw else expand(target).value

        value = variable.value if variable.raw else _REFERENCE.sub(sub, variable.value)
        visiting.pop()
        done[variable.key] = Variable(variable.key, value, variable.raw, variable.source,
                                      variable.description)
        return done[variable.key]

    return [expand(v) for v in variables]


def expand_blank(text: str, variables: Mapping[str, str]) -> str:
    """GitLab's ExpandVariables.expand: known references replaced, unknown ones removed."""
    def sub(m: re.Match[str]) -> str:
        name = m.group("a") or m.group("b") or m.group("c")
        if not name:
            return m.group(0)
        return variables.get(name, "")

    return _REFERENCE.sub(sub, text)


def slugify(text: str) -> str:
    """GitLab's CI_*_SLUG: lower case, every other character a dash, at most 63, no dash at
    either end."""
    return re.sub(r"^-+|-+$", "", re.sub(r"[^a-z0-9]", "-", text.lower())[:63])
