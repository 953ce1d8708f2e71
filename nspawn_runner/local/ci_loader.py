"""From `.gitlab-ci.yml` to one merged configuration, in GitLab's order (lib/gitlab/ci/config.rb):
YAML (anchors and merge keys work within one file), then `include` (each included file is
expanded with its own includes, they are deep-merged in order and the including file is merged
on top), then `extends` (bases deep-merged in order, then the job; hashes merge, everything
else is replaced), then `!reference` tags (looked up in the result of the extends step).

Only `include: local` can be honoured without a GitLab server; every other include type is
refused by name. Files come from a `ProjectFiles` (the working tree as git sees it)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from nspawn_runner.local.ci_rules import Context, RuleError, evaluate_rules, flatten_rules
from nspawn_runner.local.ci_variables import expand_blank

MAX_INCLUDES = 150
MAX_EXTENDS_DEPTH = 10
_REMOTE = re.compile(r"^(https?|ssh|git)://", re.I)
_YAML_EXTENSION = re.compile(r".+\.(yml|yaml)$", re.I)
_INCLUDE_KEYS = {"local", "remote", "template", "project", "file", "ref", "component",
                 "artifact", "job", "rules", "inputs", "with", "cache", "integrity"}


class ConfigError(ValueError):
    """What GitLab would reject, with its location; or what exec cannot do without GitLab."""


class Unsupported(ConfigError):
    """Valid for GitLab, impossible locally (remote includes, components, ...)."""


class ProjectFiles(Protocol):
    """The repository's files: repository-relative POSIX paths, and their content."""

    def paths(self) -> Sequence[str]: ...

    def read(self, path: str) -> bytes | None: ...


@dataclass(frozen=True)
class Reference:
    """A `!reference [key, key, ...]` tag, resolved after extends."""

    items: tuple[object, ...] | None  # None: not a sequence
    where: str

    def label(self) -> str:
        return "!reference " + json.dumps(list(self.items or ()), ensure_ascii=False,
                                          default=str)


class _Loader(yaml.SafeLoader):
    source = "?"


def _construct_reference(loader: _Loader, node: yaml.Node) -> Reference:
    where = f"{loader.source}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.SequenceNode):
        return Reference(tuple(loader.construct_sequence(node, deep=True)), where)
    return Reference(None, where)


def _construct_unknown(loader: _Loader, suffix: str, node: yaml.Node) -> object:
    # Psych, GitLab's YAML parser, ignores tags it does not know and keeps the value.
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


def _construct_timestamp(loader: _Loader, node: yaml.Node) -> object:
    # GitLab loads YAML with safe_load, which refuses Date and Time objects.
    raise yaml.constructor.ConstructorError(
        None, None, f"{node.value!r} is a date or time, which GitLab refuses to load: quote it",
        node.start_mark)


_Loader.add_constructor("!reference", _construct_reference)
_Loader.add_multi_constructor("!", _construct_unknown)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _construct_timestamp)


def load_yaml(text: str, source: str) -> object:
    """One YAML document; GitLab's header document (`spec:` then `---`) is refused by name."""
    loader = _Loader(text)
    loader.source = source
    try:
        documents = []
        while loader.check_data():  # type: ignore[no-untyped-call]
            documents.append(loader.get_data())
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {_yaml_message(e)}") from None
    finally:
        loader.dispose()
    if len(documents) > 1 and isinstance(documents[0], dict) and "spec" in documents[0]:
        raise Unsupported(f"{source}: spec:inputs (CI/CD inputs) are not supported by "
                          "nspawn-runner exec; inline the input values")
    if len(documents) > 1:
        raise ConfigError(f"{source}: more than one YAML document; GitLab reads a single one")
    return documents[0] if documents else None


def _yaml_message(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        context = f"{error.context} " if error.context else ""
        return f"{context}{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(error)


def deep_merge(base: Mapping[Any, Any], over: Mapping[Any, Any]) -> dict[Any, Any]:
    """ActiveSupport's deep_merge: hashes merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---- include ------------------------------------------------------------------------------

def wildcard_regex(pattern: str) -> re.Pattern[str]:
    """GitLab's search_files_by_wildcard_path: `**` is anything (also `/`), `*` anything but
    `/`, matched against whole repository paths."""
    escaped = re.escape(pattern).replace(r"\*\*", ".*?").replace(r"\*", "[^/]*?")
    return re.compile(f"^{escaped}$", re.S)


@dataclass
class _IncludeState:
    files: ProjectFiles
    variables: Mapping[str, str]
    file_exists: Callable[[str], bool]
    count: int = 0
    included: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _locations(value: object, where: str, state: _IncludeState) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    out: list[dict[str, Any]] = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, str):
            location = expand_blank(item, state.variables)
            out.append({"remote": location} if _REMOTE.match(location) else {"local": location})
        elif isinstance(item, dict) and item:
            unknown = sorted(set(item) - _INCLUDE_KEYS)
            if unknown:
                raise ConfigError(f"{where}: include config contains unknown keys: "
                                  f"{', '.join(unknown)}")
            out.append(item)
        else:
            raise ConfigError(f"{where}: include config should be a hash or a string "
                              f"(got {item!r})")
    return out


def _included(location: dict[str, Any], where: str, state: _IncludeState) -> bool:
    rules = location.get("rules")
    if rules is None:
        return True
    try:
        outcome = evaluate_rules(
            flatten_rules(rules, f"{where}:include:rules"),
            Context(state.variables, state.file_exists),
            default_when="always", where=f"{where}:include", workflow=True)
    except RuleError as e:
        raise ConfigError(str(e)) from None
    return outcome.included


def _local_paths(location: dict[str, Any], where: str, state: _IncludeState) -> list[str]:
    kinds = [k for k in ("local", "remote", "template", "project", "component", "artifact")
             if k in location]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: include {location!r} must name exactly one of local, "
                          "remote, template, project, component")
    kind = kinds[0]
    if kind != "local":
        detail = location[kind]
        raise Unsupported(
            f"{where}: include:{kind} ({detail}) is not supported by nspawn-runner exec: it "
            "needs the GitLab server; use include:local with a copy, or run the job on GitLab")
    if location.keys() & {"inputs", "with"}:
        raise Unsupported(f"{where}: include:local with inputs (CI/CD inputs) is not supported "
                          "by nspawn-runner exec; inline the input values")
    path = location["local"]
    if not isinstance(path, str):
        raise ConfigError(f"{where}: Included file `{path}` needs to be a string")
    path = expand_blank(path, state.variables)
    if "*" not in path:
        return [path.lstrip("/")]
    regex = wildcard_regex(path)
    matches = sorted(p for p in state.files.paths() if regex.match(p))
    if not matches:
        state.notes.append(f"{where}: include {path!r} matches no file, as it would on GitLab"
                           + (" (repository paths have no leading /)"
                              if path.startswith("/") else ""))
    return matches


def _include_file(path: str, where: str, state: _IncludeState) -> dict[Any, Any]:
    state.count += 1
    if state.count > MAX_INCLUDES:
        raise ConfigError(f"{where}: Maximum of {MAX_INCLUDES} nested includes are allowed!")
    if not _YAML_EXTENSION.match(path.rsplit("/", 1)[-1]):
        raise ConfigError(f"{where}: Included file `{path}` does not have YAML extension!")
    data = state.files.read(path)
    if data is None:
        raise ConfigError(f"{where}: Local file `{path}` does not exist!")
    text = data.decode("utf-8", "replace")
    if not text.strip():
        raise ConfigError(f"{where}: Local file `{path}` is empty!")
    state.included.append(path)
    content = load_yaml(text, path)
    if not isinstance(content, dict) or not content:
        raise ConfigError(f"{where}: Included file `{path}` does not have valid YAML syntax!")
    return expand_includes(content, path, state)


def expand_includes(content: dict[Any, Any], source: str,
                    state: _IncludeState) -> dict[Any, Any]:
    if "include" not in content:
        return content
    merged: dict[Any, Any] = {}
    for location in _locations(content["include"], source, state):
        if not _included(location, source, state):
            continue
        for path in _local_paths(location, source, state):
            merged = deep_merge(merged, _include_file(path, source, state))
    own = {k: v for k, v in content.items() if k != "include"}
    return deep_merge(merged, own)


# ---- extends ------------------------------------------------------------------------------

def apply_extends(config: dict[Any, Any]) -> dict[Any, Any]:
    context = dict(config)
    done: set[Any] = set()

    def extend(key: Any, ancestors: tuple[Any, ...]) -> Any:
        value = context[key]
        if not (isinstance(value, dict) and "extends" in value) or key in done:
            return value
        bases = value["extends"]
        names = [str(b) for b in (bases if isinstance(bases, list) else [bases])]
        unknown = [n for n in names if n not in context]
        if unknown:
            raise ConfigError(f"{key}: unknown keys in `extends` ({', '.join(unknown)})")
        invalid = [n for n in names if not isinstance(context[n], dict)]
        if invalid:
            raise ConfigError(f"{key}: invalid base hashes in `extends` ({', '.join(invalid)})")
        if len(ancestors) > MAX_EXTENDS_DEPTH:
            raise ConfigError(f"{key}: nesting too deep in `extends`")
        if key in ancestors:
            raise ConfigError(f"{key}: circular dependency detected in `extends`")
        merged: dict[Any, Any] = {}
        for name in names:
            merged = deep_merge(merged, extend(name, (*ancestors, key)))
        context[key] = deep_merge(merged, value)
        done.add(key)
        return context[key]

    for key in list(context):
        extend(key, ())
    return context


# ---- !reference ---------------------------------------------------------------------------

def resolve_references(config: dict[Any, Any]) -> dict[Any, Any]:
    resolving: set[int] = set()

    def lookup(ref: Reference) -> object:
        if ref.items is None or not ref.items or not all(isinstance(i, str) for i in ref.items):
            raise ConfigError(f"{ref.where}: {ref.label()} is not valid: use a list of keys, "
                              "as in !reference [.setup, script]")
        node: object = config
        for item in ref.items:
            if not isinstance(node, dict) or item not in node:
                node = None
                break
            node = node[item]
        if id(ref) in resolving:
            raise ConfigError(f"{ref.where}: {ref.label()} is part of a circular chain")
        resolving.add(id(ref))
        try:
            value = resolve(node)
        finally:
            resolving.discard(id(ref))
        if value is None or value is False:
            raise ConfigError(f"{ref.where}: {ref.label()} could not be found")
        return value

    def resolve(node: object) -> object:
        if isinstance(node, Reference):
            return lookup(node)
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    result = resolve(config)
    assert isinstance(result, dict)
    return result


# ---- all of it ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Loaded:
    config: dict[Any, Any]
    included: tuple[str, ...]  # local files read through include, in order
    notes: tuple[str, ...]


def load_config(text: str, source: str, files: ProjectFiles, variables: Mapping[str, str],
                file_exists: Callable[[str], bool]) -> Loaded:
    """`variables`: what include paths and include rules may use (predefined and pipeline
    variables; GitLab does not let them see variables defined in YAML)."""
    if not text.strip():
        raise ConfigError(f"{source}: Please provide content of {source}")
    content = load_yaml(text, source)
    if not isinstance(content, dict):
        raise ConfigError(f"{source}: Invalid configuration format (the top level must be a "
                          "mapping of keywords and job names)")
    state = _IncludeState(files, variables, file_exists)
    merged = expand_includes(content, source, state)
    resolved = resolve_references(apply_extends(merged))
    return Loaded(resolved, tuple(state.included), tuple(state.notes))
