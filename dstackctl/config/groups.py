"""Replica groups, routers and scaling rules, as dstack 0.22.5 defines them.

Source of truth: `dstack/_internal/core/models/configurations.py` (`ReplicaGroup`,
`ScalingSpec`, `ServiceConfigurationParams` validators) and `core/models/routers.py` of dstack
0.22.5. Names, defaults and rules match; the sentences say the same thing in our voice.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PlainSerializer, PlainValidator, field_validator, model_validator

from dstackctl.config.fields import (
    Duration,
    PythonVersion,
    Resources,
    Strict,
    empty_list,
    ignored_field,
    python_version,
)
from dstackctl.config.group_refs import ref_problems
from dstackctl.config.issues import Loc
from dstackctl.config.units import Range, format_duration, parse_count_range

GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}\Z")
SCALING_WINDOWS = (30, 60, 300)
DEFAULT_SCALING_WINDOW = 60
# Image sources that dstack refuses together (image and nvcc are not among them).
EXCLUSIVE_SOURCES = (("image", "python"), ("image", "docker"), ("python", "docker"), ("nvcc", "docker"))


def check_group_name(name: str) -> str:
    if not GROUP_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a valid group name: 1 to 40 characters, lower-case letters, digits "
            f"and '-', starting with a letter or digit"
        )
    return name


def replica_range(value: object) -> Range[int]:
    """dstack's replica count: `2`, `0..4` or `..4` (minimum 0); the maximum is required."""
    if isinstance(value, Range):
        return value
    count = parse_count_range(value, "a replica count")
    if count.max is None:
        raise ValueError(f"a replica range needs a maximum, such as 1..4 (got {count})")
    low = 0 if count.min is None else count.min
    if low < 0:
        raise ValueError(f"replicas cannot be negative, got {low}")
    return Range(low, count.max)


ReplicaRange = Annotated[
    Range[int],
    PlainValidator(replica_range, json_schema_input_type=int | str | dict[str, Any]),
    PlainSerializer(str, return_type=str),
]


class ScalingSpec(Strict):
    metric: Literal["rps"] = Field(description="The metric to track; only `rps` (requests per second).")
    target: Annotated[float, Field(gt=0)] = Field(
        description="Requests per second per replica that the autoscaler aims for (> 0)."
    )
    window: Duration | None = Field(
        None, description="Window the request rate is measured over: 30s, 60s or 5m (default 60s)."
    )
    scale_up_delay: Duration = Field(300, description="Minimum time between a scaling event and a scale-up.")
    scale_down_delay: Duration = Field(
        600, description="Minimum time between a scaling event and a scale-down."
    )

    @field_validator("window")
    @classmethod
    def _allowed_window(cls, value: int | None) -> int | None:
        if value is not None and value not in SCALING_WINDOWS:
            allowed = ", ".join(format_duration(w) for w in SCALING_WINDOWS)
            raise ValueError(f"the window must be one of {allowed}, got {format_duration(value)}")
        return value


def router_type(value: object) -> object:
    return "smg" if value == "sglang" else value  # dstack's name for `smg` before 0.22.4


class RouterConfig(Strict):
    type: Annotated[Literal["smg", "dynamo"], BeforeValidator(router_type)] = Field(
        "smg",
        description="`smg` (or the older `sglang`): the agent keeps its worker list; "
        "`dynamo`: its workers find it themselves.",
    )


class ReplicaGroup(Strict):
    """One group of identical replicas in a service with `replicas:` as a list (or `groups:`)."""

    name: str | None = Field(None, description="Group name (default: its position, `0`, `1`, ...).")
    count: ReplicaRange | None = Field(None, description="Replicas in this group; same as `replicas`.")
    replicas: ReplicaRange | None = Field(
        None, description="Replicas in this group: `2`, or a range such as `0..4` with `scaling`."
    )
    scaling: ScalingSpec | None = Field(None, description="Autoscaling rules; needs a range.")
    resources: Resources = Field(default_factory=Resources, description="What each replica needs.")
    commands: list[str] = Field(default_factory=empty_list, description="Shell commands of this group.")
    image: str | None = Field(None, min_length=1, description="Docker image of this group.")
    python: (
        Annotated[
            PythonVersion, BeforeValidator(python_version, json_schema_input_type=PythonVersion | float)
        ]
        | None
    ) = Field(None, description="Python version on dstack's base image (excludes `image`, `docker`).")
    nvcc: bool | None = Field(None, description="dstack's base image with the CUDA compiler.")
    docker: bool | None = Field(None, description="Docker-in-Docker: dstack's dind image, privileged.")
    privileged: bool | None = Field(None, description="Run this group's replicas privileged.")
    router: RouterConfig | None = Field(None, description="This group runs the service's router.")
    spot_policy: Literal["spot", "on-demand", "auto"] | None = ignored_field("Spot instance policy.")
    reservation: str | None = ignored_field("Capacity reservation.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_group_name(value)

    @model_validator(mode="before")
    @classmethod
    def _count_unread_with_replicas(cls, data: Any) -> Any:
        """dstack drops `count` unread when `replicas` is given too."""
        if isinstance(data, dict) and data.get("replicas") is not None and "count" in data:
            data = {key: value for key, value in data.items() if key != "count"}
        return data

    @property
    def size(self) -> Range[int]:
        """`replicas`, or its alias `count` (dstack prefers `replicas` when both are given)."""
        found = self.replicas if self.replicas is not None else self.count
        return found if found is not None else Range(1, 1)

    def problems(self, where: Loc) -> list[tuple[Loc, str]]:
        """dstack's rules within a group, each with its path."""
        found: list[tuple[Loc, str]] = []
        if self.replicas is None and self.count is None:
            found.append((where, "a replica group needs `count` (or `replicas`), such as `count: 1`"))
        for key, other in EXCLUSIVE_SOURCES:
            if _given(getattr(self, key), key) and _given(getattr(self, other), other):
                found.append(
                    ((*where, other), f"`{key}` and `{other}` exclude each other within a replica group")
                )
        if self.docker is True and self.privileged is False:
            found.append(
                (
                    (*where, "privileged"),
                    "`privileged: false` does not go with `docker: true` "
                    "(Docker-in-Docker needs privileged mode); remove it",
                )
            )
        found += scaling_problems(self.size, self.scaling, where, "replicas" if self.replicas else "count")
        return found


def _given(value: object, key: str) -> bool:
    return value is True if key in ("docker", "nvcc") else value is not None


def scaling_problems(
    size: Range[int], scaling: ScalingSpec | None, where: Loc, key: str = "replicas"
) -> list[tuple[Loc, str]]:
    """A range needs `scaling` and `scaling` needs a range (dstack's rule, per level)."""
    if size.min != size.max and scaling is None:
        return [
            (
                (*where, key),
                f"a range of replicas ({size}) needs `scaling`, such as "
                "`scaling: {metric: rps, target: 10}`",
            )
        ]
    if size.min == size.max and scaling is not None:
        return [((*where, "scaling"), f"`scaling` needs `{key}` to be a range, such as 1..4")]
    return []


# Fields that a service with groups may set at its own level or in its groups, never both
# (dstack's `validate_no_mixed_service_and_group_container_fields`).
_ONE_LEVEL = ("image", "docker", "privileged", "python", "nvcc", "spot_policy", "reservation")
_FLAGS = ("docker", "privileged", "nvcc")  # set at the service level only when true


def service_problems(service: Any) -> list[tuple[Loc, str]]:
    """dstack's rules for `replicas`, `scaling` and groups at the service level, with paths.

    Group paths start with `groups`; the loader shows them under `replicas` when the file
    gave the groups there.
    """
    found: list[tuple[Loc, str]] = [
        ((other,), f"`{key}` and `{other}` exclude each other; keep one of them")
        for key, other in EXCLUSIVE_SOURCES[1:]
        if _given(getattr(service, key), key) and _given(getattr(service, other), other)
    ]
    found += _address_problems(service)
    if service.groups is None:
        if not service.commands and not service.image:
            found.append(((), "nothing to run: set `commands`, or `image` to run the image's own command"))
        size = service.replicas if service.replicas is not None else Range(1, 1)
        return found + scaling_problems(size, service.scaling, ())
    for key in ("scaling", "commands"):
        if getattr(service, key):
            found.append(((key,), f"with replica groups, `{key}` belongs in each group; move it there"))
    groups = service.replica_groups
    if not groups:
        return [*found, (("groups",), "a list of replica groups needs at least one group")]
    for key in _ONE_LEVEL:
        value = getattr(service, key)
        if value is True if key in _FLAGS else value is not None:
            both = ", ".join(str(g.name) for g in groups if getattr(g, key) is not None)
            if both:
                found.append(((key,), f"`{key}` is set here and in group(s) {both}; set it in one place"))
    across = (*EXCLUSIVE_SOURCES, ("image", "nvcc"))  # dstack allows image with nvcc in one place only
    for key, other in across + tuple((b, a) for a, b in across):
        if _given(getattr(service, key), key):
            clash = ", ".join(str(g.name) for g in groups if getattr(g, other) is not None)
            if clash:
                found.append(((key,), f"`{key}` here conflicts with `{other}` in group(s) {clash}"))
    return found + _each_group_problems(service, groups)


def _address_problems(service: Any) -> list[tuple[Loc, str]]:
    """`${{ groups[i].replicas[j].IP_ADDRESS }}`: in commands only, and within the groups."""
    found: list[tuple[Loc, str]] = []  # `env`: refused with the entry (fields.py)
    groups = service.replica_groups
    minimums = [g.size.min or 0 for g in groups]
    commands: list[tuple[Loc, str]] = [(("commands", k), c) for k, c in enumerate(service.commands)]
    if service.groups is not None:
        commands = [
            (("groups", i, "commands", k), c) for i, g in enumerate(groups) for k, c in enumerate(g.commands)
        ]
    for where, command in commands:
        found += [(where, message) for message in ref_problems(command, minimums)]
    return found


def _each_group_problems(service: Any, groups: list[ReplicaGroup]) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    seen: dict[str, int] = {}
    routers = 0
    for index, group in enumerate(groups):
        where: Loc = ("groups", index)
        found += group.problems(where)
        if str(group.name) in seen:
            found.append(((*where, "name"), f"duplicates the name of group {seen[str(group.name)]}"))
        seen.setdefault(str(group.name), index)
        if not group.commands and group.image is None and service.image is None:
            found.append((where, "nothing to run: set `commands` or `image` in the group, or `image` above"))
        if group.router is not None:
            routers += 1
            if routers > 1:
                found.append(((*where, "router"), "only one replica group may run the router"))
            if group.size.min != 1 or group.size.max != 1:
                key = "replicas" if group.replicas is not None else "count"
                found.append(((*where, key), "the router group must have exactly 1 replica for now"))
    return found


def refuse_service_router(value: object) -> object:
    if value is not None:
        raise ValueError(
            "since dstack 0.21 the router is a replica group: give one group `router: {type: smg}` "
            "and `count: 1`, and the workers another group"
        )
    return value
