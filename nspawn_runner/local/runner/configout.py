"""The config stage's stdout, parsed as strictly as gitlab-runner's Go JSON decoder."""

from __future__ import annotations

import json
from dataclasses import dataclass


class ConfigParseError(ValueError):
    pass


@dataclass
class ConfigOutput:
    """The config stage's JSON, as ``api.ConfigExecOutput`` (None = key absent or null)."""

    builds_dir: str | None = None
    cache_dir: str | None = None
    builds_dir_is_shared: bool | None = None
    hostname: str | None = None
    driver_name: str | None = None
    driver_version: str | None = None
    has_driver: bool = False
    job_env: dict[str, str] | None = None
    shell: str | None = None


def _reject_constant(name: str) -> object:
    raise ConfigParseError(f"invalid character '{name[0]}' looking for beginning of value")


def _go_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _pairs(value: object) -> list[tuple[str, object]] | None:
    if isinstance(value, _Obj):
        return value.pairs
    return None


class _Obj:
    """A JSON object keeping its key order and duplicates (Go applies them in order)."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs


def parse_config_output(data: bytes) -> ConfigOutput | None:
    """Parse config_exec's stdout like the runner: 0 bytes -> None (no change); otherwise one
    JSON value (``json.Unmarshal`` rules) or ConfigParseError."""
    if len(data) == 0:
        return None
    text = data.decode("utf-8", "replace")
    try:
        value = json.loads(text, object_pairs_hook=_Obj, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        if not text.strip():
            raise ConfigParseError("unexpected end of JSON input") from exc
        raise ConfigParseError(str(exc)) from exc
    out = ConfigOutput()
    if value is None:
        return out
    pairs = _pairs(value)
    if pairs is None:
        raise ConfigParseError(f"json: cannot unmarshal {_go_type(value)} into Go value of "
                               "type custom.ConfigExecOutput")

    def want_str(key: str, item: object) -> str | None:
        if item is None or isinstance(item, str):
            return item
        raise ConfigParseError(f"json: cannot unmarshal {_go_type(item)} into Go struct field "
                               f"ConfigExecOutput.{key} of type string")

    for raw_key, item in pairs:
        key = raw_key.casefold()
        if key in ("builds_dir", "cache_dir", "hostname", "shell"):
            text_value = want_str(key, item)
            if text_value is not None:
                setattr(out, key, text_value)
        elif key == "builds_dir_is_shared":
            if item is not None and not isinstance(item, bool):
                raise ConfigParseError(f"json: cannot unmarshal {_go_type(item)} into Go struct "
                                       "field ConfigExecOutput.builds_dir_is_shared of type bool")
            if item is not None:
                out.builds_dir_is_shared = item
        elif key == "driver":
            if item is None:
                continue
            driver = _pairs(item)
            if driver is None:
                raise ConfigParseError(f"json: cannot unmarshal {_go_type(item)} into Go struct "
                                       "field ConfigExecOutput.driver of type api.DriverInfo")
            out.has_driver = True
            for dkey, dval in driver:
                if dkey.casefold() == "name":
                    name = want_str("driver.name", dval)
                    out.driver_name = out.driver_name if name is None else name
                elif dkey.casefold() == "version":
                    version = want_str("driver.version", dval)
                    out.driver_version = out.driver_version if version is None else version
        elif key == "job_env":
            if item is None:
                continue
            env = _pairs(item)
            if env is None:
                raise ConfigParseError(f"json: cannot unmarshal {_go_type(item)} into Go struct "
                                       "field ConfigExecOutput.job_env of type map[string]string")
            out.job_env = out.job_env if out.job_env is not None else {}
            for ekey, evalue in env:
                if evalue is not None and not isinstance(evalue, str):
                    raise ConfigParseError(
                        f"json: cannot unmarshal {_go_type(evalue)} into Go struct field "
                        f"ConfigExecOutput.job_env of type string")
                out.job_env[ekey] = evalue or ""
    return out
