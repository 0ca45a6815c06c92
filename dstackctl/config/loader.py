"""Load a service file: YAML -> validated model, or every problem with its line and path."""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from dstackctl.config.exposure import exposure_warnings
from dstackctl.config.fields import SECRET_NAMESPACES
from dstackctl.config.interpolation import interpolate, references
from dstackctl.config.issues import ConfigError, Issue, Loc, dotted
from dstackctl.config.models import IGNORED_FIELDS, ServiceConfiguration, cross_field_problems
from dstackctl.config.probe_model import ProbeConfig
from dstackctl.config.yaml_source import MAX_FILE_BYTES, SourceError, YamlSource, read_yaml, too_big

# Values under these paths may be secret: errors name the place, never echo the input.
_SECRET_ROOTS = ("env", "registry_auth")


@dataclass
class LoadedConfig:
    """A valid configuration with what is needed to report on it later."""

    file: str
    config: ServiceConfiguration
    data: dict[str, Any]
    source: YamlSource
    warnings: list[Issue] = field(default_factory=list)

    def issue(self, loc: Loc, message: str) -> Issue:
        return Issue(self.file, self.source.line_of(loc), dotted(loc), message)

    def resolve_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Values of `env` for the replicas: bare names and `${{ secrets.X }}` come from `environ`.

        Raises ConfigError naming every variable that is missing; values never appear in it.
        """
        resolved: dict[str, str] = {}
        problems: list[Issue] = []
        for index, (name, value) in enumerate(self.config.environment.items()):
            if value is None:
                if name in environ:
                    resolved[name] = environ[name]
                else:
                    problems.append(
                        self.issue(
                            ("env", index),
                            f"{name} is listed without a value and is not set in your environment; "
                            f"export {name}=... or pass -e {name}=...",
                        )
                    )
                continue
            try:
                resolved[name] = interpolate(value, {"secrets": environ, "env": environ}, SECRET_NAMESPACES)
            except KeyError as exc:
                ref = exc.args[0]
                problems.append(
                    self.issue(
                        ("env", index),
                        f"{name} uses {ref}, but {ref.name} is not set in your environment; "
                        f"export {ref.name}=...",
                    )
                )
        if problems:
            raise ConfigError(problems)
        return resolved


def load_service_file(path: str | Path) -> LoadedConfig:
    name = str(path)
    try:
        with open(path, "rb") as handle:
            # One byte past the limit at most: a huge file (or /dev/zero) is never read whole.
            raw = handle.read(MAX_FILE_BYTES + 1)
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        raise ConfigError([Issue(name, None, "", "no such file")]) from None
    except IsADirectoryError:
        raise ConfigError([Issue(name, None, "", "is a folder, not a service file")]) from None
    except OSError as exc:
        raise ConfigError([Issue(name, None, "", f"cannot be read: {exc.strerror}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([Issue(name, None, "", too_big(size))])
    return parse_service(raw, name)


def parse_service(raw: bytes | str, file: str = "<config>") -> LoadedConfig:
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    try:
        source = read_yaml(raw)
    except SourceError as exc:
        raise ConfigError([Issue(file, exc.line, "", exc.message)]) from None
    problems = [
        Issue(file, line, dotted(loc), f"is given twice (first at line {first})")
        for loc, line, first in source.duplicate_keys
    ]
    data: dict[str, Any] = source.data
    if data.get("type") != "service":
        problems.append(_wrong_type(file, source))
        raise ConfigError(problems)
    try:
        config = ServiceConfiguration.model_validate(data)
    except ValidationError as exc:
        problems += _translate(exc, file, source)
        problems += [
            Issue(file, source.line_of(loc), dotted(loc), message)
            for loc, message in _raw_cross_field_problems(data)
        ]
        raise ConfigError(_sorted(problems)) from None
    for loc, message in config.problems():
        written = as_written(loc, data)
        problems.append(Issue(file, source.line_of(written), dotted(written), message))
    if problems:
        raise ConfigError(_sorted(problems))
    loaded = LoadedConfig(file=file, config=config, data=data, source=source)
    loaded.warnings = _sorted(_warnings(loaded))
    return loaded


def as_written(loc: Loc, data: dict[str, Any]) -> Loc:
    """A path into `groups` as the file wrote it: under `replicas` when it gave a list there."""
    if loc[:1] == ("groups",) and "groups" not in data and isinstance(data.get("replicas"), list):
        return ("replicas", *loc[1:])
    return loc


def _raw_cross_field_problems(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """The cross-field rules applied to the parts of an invalid file that are valid by themselves,
    so that one run reports every problem."""
    env = data.get("env")
    env_names: set[str] | None = None
    if env is None:
        env_names = set()
    elif isinstance(env, list):
        env_names = {entry.partition("=")[0] for entry in env if isinstance(entry, str)}
    elif isinstance(env, dict):
        env_names = {str(name) for name in env}
    probes: list[tuple[int, ProbeConfig]] = []
    raw_probes = data.get("probes")
    for index, item in enumerate(raw_probes if isinstance(raw_probes, list) else []):
        try:
            probes.append((index, ProbeConfig.model_validate(item)))
        except ValidationError:
            continue
    return cross_field_problems(data.get("image"), data.get("python"), env_names, probes)


def _sorted(problems: list[Issue]) -> list[Issue]:
    return sorted(problems, key=lambda issue: (issue.line or 0, issue.path))


def _wrong_type(file: str, source: YamlSource) -> Issue:
    value = source.data.get("type")
    if value is None:
        message = "`type` is required; this tool runs `type: service` files"
    elif value in ("task", "dev-environment", "fleet", "volume", "gateway"):
        message = f"is {value!r}; dstackctl runs services only (`type: service`)"
    else:
        message = f"expected 'service', got {_show(value)}"
    return Issue(file, source.line_of(("type",)), "type", message)


def _warnings(loaded: LoadedConfig) -> list[Issue]:
    found = [
        loaded.issue((key,), "is a dstack cloud setting; ignored on one machine")
        for key in loaded.data
        if key in IGNORED_FIELDS
    ]
    groups_key = as_written(("groups",), loaded.data)
    for index, group in enumerate(loaded.config.groups or []):
        found += [
            loaded.issue((*groups_key, index, key), "is a dstack cloud setting; ignored on one machine")
            for key in ("spot_policy", "reservation")
            if getattr(group, key) is not None
        ]
    found += [loaded.issue(as_written(loc, loaded.data), m) for loc, m in exposure_warnings(loaded.config)]
    if loaded.config.dstack:
        found.append(
            loaded.issue(("dstack",), "has no effect here: there is no dstack server on this machine")
        )
    resources = loaded.data.get("resources")
    if isinstance(resources, dict) and "disk" in resources:
        found.append(loaded.issue(("resources", "disk"), "is ignored on one machine"))
    if loaded.config.setup:
        found.append(loaded.issue(("setup",), "is deprecated; its commands run before `commands`"))
    for index, value in enumerate(loaded.config.environment.values()):
        for ref in references(value or "", SECRET_NAMESPACES):
            if ref.namespace == "secrets":
                found.append(
                    loaded.issue(
                        ("env", index),
                        f"{ref} is read from the environment variable {ref.name} "
                        f"(there is no dstack secret store here)",
                    )
                )
    return found


# --- pydantic errors -> sentences -----------------------------------------------------------

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "none_required": "nothing (null)",
}


def _translate(exc: ValidationError, file: str, source: YamlSource) -> list[Issue]:
    by_place: dict[Loc, list[str]] = {}
    union_branches: dict[Loc, list[Any]] = {}
    for error in exc.errors(include_url=False):
        loc = as_written(tuple(error["loc"]), source.data)
        place, is_branch = _place(loc, source)
        if is_branch:
            union_branches.setdefault(place, []).append(error)
            continue
        by_place.setdefault(place, []).append(_message(error, place, source))
    for place, errors in union_branches.items():
        if place in by_place:
            continue
        if len(errors) == 1:
            # Not a union: one error below a value written as a scalar (`port: 70000`).
            by_place[place] = [_message(errors[0], place, source)]
            continue
        phrases = [_expected_phrase(error) for error in errors]
        unique = [p for i, p in enumerate(phrases) if p and p not in phrases[:i]]
        message = "expected " + " or ".join(unique) if unique else "has an invalid value"
        by_place[place] = [message + _got(place, source)]
    return [
        Issue(file, source.line_of(place), dotted(place), message)
        for place, messages in by_place.items()
        for message in dict.fromkeys(messages)
    ]


def _place(loc: Loc, source: YamlSource) -> tuple[Loc, bool]:
    """The path an error is about, and whether the rest of its loc names a union branch."""
    present = 0
    for end in range(len(loc), -1, -1):
        if source.value_at(loc[:end])[0]:
            present = end
            break
    if present == len(loc):
        return loc, False
    parent = loc[:present]
    nxt = loc[present]
    _, parent_value = source.value_at(parent)
    if isinstance(parent_value, dict) and len(loc) == present + 1:
        model = _model_at(parent)
        if model is not None and nxt in model.model_fields:
            return loc, False
    return parent, True


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc`, following field annotations."""
    current: Any = ServiceConfiguration
    if loc[:1] == ("replicas",) and len(loc) > 1 and isinstance(loc[1], int):
        loc = ("groups", *loc[1:])
    for part in loc:
        model = _find_model(current)
        if isinstance(part, int):
            current = _item_type(current)
        elif model is not None and part in model.model_fields:
            current = model.model_fields[part].annotation
        else:
            return None
    return _find_model(current)


def _unwrap(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [leaf for arg in typing.get_args(annotation) for leaf in _unwrap(arg)]
    return [annotation]


def _find_model(annotation: Any) -> type[BaseModel] | None:
    for leaf in _unwrap(annotation):
        if isinstance(leaf, type) and issubclass(leaf, BaseModel):
            return leaf
    return None


def _item_type(annotation: Any) -> Any:
    for leaf in _unwrap(annotation):
        if typing.get_origin(leaf) is list:
            return typing.get_args(leaf)[0]
    return None


def _expected_phrase(error: Any) -> str:
    kind = error["type"]
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind == "literal_error":
        return str(error["ctx"]["expected"])
    if kind == "value_error":
        return ""
    return ""


def _message(error: Any, loc: Loc, source: YamlSource) -> str:
    kind = error["type"]
    ctx = error.get("ctx", {})
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}" + _got(loc, source)
    if kind == "literal_error":
        return f"expected {ctx['expected']}" + _got(loc, source)
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}" + _got(loc, source)
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}" + _got(loc, source)
    if kind == "too_long":
        return f"has {ctx.get('actual_length')} items; at most {ctx['max_length']} are allowed"
    if kind == "string_too_long":
        return f"is longer than {ctx['max_length']} characters"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else error["msg"]
    message = str(error["msg"])
    return message[0].lower() + message[1:]


def _unknown_key(loc: Loc) -> str:
    key = loc[-1]
    model = _model_at(loc[:-1])
    allowed = sorted(model.model_fields) if model else []
    import difflib  # here: only a misspelt key needs it (~6 ms to import)

    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown key {str(key)!r}; did you mean {close[0]!r}?"
    if allowed and len(allowed) <= 12:
        return f"unknown key {str(key)!r}; expected one of {', '.join(allowed)}"
    return f"unknown key {str(key)!r}"


def _got(loc: Loc, source: YamlSource) -> str:
    if loc and loc[0] in _SECRET_ROOTS:
        return ""
    present, value = source.value_at(loc)
    if not present:
        return ""
    return f", got {_show(value)}"


def _show(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
