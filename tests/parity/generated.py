"""Generated service files for the parity tier: every combination of a few axes.

Deterministic (itertools.product, no randomness), so ids are stable and differences.py can name
them with patterns. An id reads

    gen/<form>/<source>@<level>/scaling-<where>/router-<where>/<commands>

- form: how many replicas: `omitted`, `int` (2), `range` (1..3); or groups: `list`
  (`replicas:` as a list), `groups` (`groups:`, fixed counts), `groups-range` (`groups:`,
  the worker group counts 1..3);
- source: where the image comes from: `none`, `image`, `python`, `docker`, `nvcc`,
  `python+nvcc`;
- level: `service` or `group` (groups only: the source keys go into every group), or `both`
  (groups only: at the service level and in every group); `none` has only `service`;
- scaling (`{metric: rps, target: 10}`): `none`, `service`, `group` (groups only: the worker group);
- router (`{type: smg}`): `none`, `service` (top-level `router:`), `group` (groups only: an extra
  first group `router` with count 1);
- commands: `cmds` or `nocmds` without groups; groups always have their own (`cmds`).
"""

from __future__ import annotations

import itertools
from typing import Any

import yaml

FORMS = ("omitted", "int", "range")
GROUP_FORMS = ("list", "groups", "groups-range")
SOURCES: dict[str, dict[str, Any]] = {
    "none": {},
    "image": {"image": "lmsysorg/sglang:latest"},
    "python": {"python": "3.12"},
    "docker": {"docker": True},
    "nvcc": {"nvcc": True},
    "python+nvcc": {"python": "3.12", "nvcc": True},
}
SCALING = {"metric": "rps", "target": 10}
ROUTER = {"type": "smg"}
COMMANDS = ["python -m sglang.launch_server --port 8000"]


def _without_groups(form: str, source: str, scaling: str, router: str, commands: str) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "service", "port": 8000, **SOURCES[source]}
    if commands == "cmds":
        data["commands"] = list(COMMANDS)
    if form == "int":
        data["replicas"] = 2
    elif form == "range":
        data["replicas"] = "1..3"
    if scaling == "service":
        data["scaling"] = dict(SCALING)
    if router == "service":
        data["router"] = dict(ROUTER)
    return data


def _with_groups(form: str, source: str, level: str, scaling: str, router: str) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "service", "port": 8000}
    if level in ("service", "both"):
        data.update(SOURCES[source])
    workers: dict[str, Any] = {"name": "workers", "count": "1..3" if form == "groups-range" else 2}
    workers["commands"] = list(COMMANDS)
    groups: list[dict[str, Any]] = [workers]
    if router == "group":
        groups.insert(
            0, {"name": "router", "count": 1, "router": dict(ROUTER), "commands": ["smg --port 8000"]}
        )
    if scaling == "group":
        workers["scaling"] = dict(SCALING)
    if level in ("group", "both"):
        for group in groups:
            group.update(SOURCES[source])
    if scaling == "service":
        data["scaling"] = dict(SCALING)
    if router == "service":
        data["router"] = dict(ROUTER)
    data["replicas" if form == "list" else "groups"] = groups
    return data


def generated_cases() -> list[tuple[str, str]]:
    """(id, YAML text) for every combination; a few hundred."""
    cases: list[tuple[str, str]] = []
    for form, source, scaling, router, commands in itertools.product(
        FORMS, SOURCES, ("none", "service"), ("none", "service"), ("cmds", "nocmds")
    ):
        data = _without_groups(form, source, scaling, router, commands)
        case_id = f"gen/{form}/{source}@service/scaling-{scaling}/router-{router}/{commands}"
        cases.append((case_id, yaml.safe_dump(data, sort_keys=False)))
    for form, source, level, scaling, router in itertools.product(
        GROUP_FORMS,
        SOURCES,
        ("service", "group", "both"),
        ("none", "service", "group"),
        ("none", "service", "group"),
    ):
        if source == "none" and level != "service":
            continue  # the same file as none@service
        data = _with_groups(form, source, level, scaling, router)
        case_id = f"gen/{form}/{source}@{level}/scaling-{scaling}/router-{router}/cmds"
        cases.append((case_id, yaml.safe_dump(data, sort_keys=False)))
    return cases
