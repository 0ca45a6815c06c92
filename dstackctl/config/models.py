"""Pydantic models of a dstack `type: service` file, as dstack accepts it.

Fields that mean something on one machine are typed precisely; dstack's cloud settings are
accepted (loosely typed) so the same file runs on dstack and here, and the loader warns that
they are ignored. Cross-field rules that need a precise path live in `ServiceConfiguration.problems`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from dstackctl.config.exposure import mount_problems, size_problems
from dstackctl.config.fields import (
    MAX_PROBES,
    PROBE_NAMESPACES,
    EnvEntry,
    ModelSpec,
    OffDuration,
    PortMapping,
    PythonVersion,
    RegistryAuth,
    Resources,
    RetryPolicy,
    Strict,
    VolumeMount,
    check_env_unique,
    check_run_name,
    empty_list,
    env_to_list,
    ignored_field,
    model_from_scalar,
    port_from_scalar,
    python_version,
    retry_from_scalar,
    volume_from_scalar,
)
from dstackctl.config.groups import (
    ReplicaGroup,
    ReplicaRange,
    ScalingSpec,
    refuse_service_router,
    service_problems,
)
from dstackctl.config.interpolation import references
from dstackctl.config.issues import Loc
from dstackctl.config.probe_model import HTTPHeader, ProbeConfig
from dstackctl.config.units import Range
from dstackctl.labels import DEFAULT_GROUP


class ServiceConfiguration(Strict):
    """A dstack service: replicas of one container behind one endpoint, gated by probes."""

    type: Literal["service"] = Field(description="Always `service`.")
    name: Annotated[str, AfterValidator(check_run_name)] | None = Field(
        None, description="The run name (default: the file name or `-n`)."
    )
    image: str | None = Field(None, min_length=1, description="Docker image of the replicas.")
    python: (
        Annotated[
            PythonVersion, BeforeValidator(python_version, json_schema_input_type=PythonVersion | float)
        ]
        | None
    ) = Field(
        None,
        description="Use dstack's base image with a venv of this Python version (excludes `image`).",
    )
    nvcc: bool | None = Field(
        None, description="With `python`: use the base image that has the CUDA compiler."
    )
    commands: list[str] = Field(default_factory=empty_list, description="Shell commands, joined with ` && `.")
    setup: list[str] = Field(
        default_factory=empty_list, description="Deprecated: commands run before `commands`."
    )
    entrypoint: str | None = Field(
        None, description="Replaces the shell that runs `commands` (split like a shell)."
    )
    shell: str | None = Field(
        None,
        description="Shell that runs `commands`: `sh`, `bash` or a path (default /bin/sh with `image`).",
    )
    working_dir: str | None = Field(None, description="Working directory in the container.")
    home_dir: str | None = Field(None, description="Home directory of the user in the container.")
    user: str | None = Field(None, description="User (and group) to run as, e.g. `1000` or `app:app`.")
    privileged: bool = Field(False, description="Run the replicas privileged.")
    env: Annotated[
        list[EnvEntry],
        BeforeValidator(
            env_to_list,
            json_schema_input_type=list[str] | dict[str, str | int | float | bool | None],
        ),
        AfterValidator(check_env_unique),
    ] = Field(
        default_factory=empty_list,
        description="Variables: `NAME=value`, or a bare `NAME` taken from your environment; or a mapping.",
    )
    port: Annotated[
        PortMapping,
        BeforeValidator(port_from_scalar, json_schema_input_type=int | str | PortMapping),
    ] = Field(
        description="The port the app listens on (`8000`), or `LOCAL:CONTAINER` to set the endpoint's port.",
    )
    replicas: ReplicaRange | None = Field(
        None, description="How many replicas to run (default 1), or a list of replica groups."
    )
    groups: list[ReplicaGroup] | None = Field(
        None, description="Replica groups (the same as `replicas:` given as a list)."
    )
    scaling: ScalingSpec | None = Field(None, description="Autoscaling rules; needs a replica range.")
    resources: Resources = Field(default_factory=Resources, description="What each replica needs.")
    volumes: list[
        Annotated[
            VolumeMount,
            BeforeValidator(volume_from_scalar, json_schema_input_type=str | VolumeMount | dict[str, Any]),
        ]
    ] = Field(
        default_factory=empty_list, description="Mounts: `/host/path:/container/path[:ro]` or a mapping."
    )
    model: (
        Annotated[ModelSpec, BeforeValidator(model_from_scalar, json_schema_input_type=str | ModelSpec)]
        | None
    ) = Field(None, description="The model served; without `probes` it adds a chat-completion probe.")
    probes: list[ProbeConfig] | None = Field(
        None, max_length=MAX_PROBES, description="Readiness probes (at most 10); `[]` means none."
    )
    auth: bool = Field(
        False,
        description="Require `Authorization: Bearer TOKEN` at the endpoint (`dstackctl token NAME` "
        "prints TOKEN). dstack's default is true; here, without it, the endpoint on 127.0.0.1 is open.",
    )
    registry_auth: RegistryAuth | None = Field(None, description="Credentials to pull a private image.")
    retry: Annotated[
        RetryPolicy | None,
        BeforeValidator(retry_from_scalar, json_schema_input_type=bool | RetryPolicy),
    ] = Field(None, description="Restart replicas that exit: `true` or `{on_events, duration}`.")
    stop_duration: OffDuration | None = Field(
        None, description="Grace period between SIGTERM and SIGKILL when stopping a replica."
    )
    docker: bool | None = Field(None, description="Docker-in-Docker: dstack's dind image, privileged.")
    dstack: bool = Field(False, description="dstack: reach the dstack server from the run (none here).")
    router: Annotated[Any, AfterValidator(refuse_service_router)] = Field(
        None, description="Since dstack 0.21 a router is a replica group's `router`."
    )

    @model_validator(mode="before")
    @classmethod
    def _groups_from_replicas(cls, data: Any) -> Any:
        """`replicas:` given as a list is the older spelling of `groups:` (as in dstack)."""
        if isinstance(data, dict) and isinstance(data.get("replicas"), list):
            if data.get("groups") is not None:
                raise ValueError("`replicas` as a list and `groups` exclude each other; keep one")
            data = {**data, "groups": data["replicas"]}
            del data["replicas"]
        elif isinstance(data, dict) and data.get("groups") is not None and data.get("replicas") is not None:
            raise ValueError("`replicas` and `groups` exclude each other; give the counts in the groups")
        return data

    @property
    def replica_groups(self) -> list[ReplicaGroup]:
        """The groups, named; a service without groups is one group named `0` (as in dstack)."""
        if self.groups is not None:
            return [
                group if group.name is not None else group.model_copy(update={"name": str(index)})
                for index, group in enumerate(self.groups)
            ]
        size = self.replicas if self.replicas is not None else Range(1, 1)
        group = ReplicaGroup(
            name=DEFAULT_GROUP, replicas=size, commands=self.commands, resources=self.resources
        )
        return [group.model_copy(update={"scaling": self.scaling})]

    @property
    def group_counts(self) -> dict[str, int]:
        """Replicas to start per group: the count, or a range's minimum (the autoscaler
        takes it from there, as dstack starts a range at its minimum)."""
        return {str(group.name): group.size.min or 0 for group in self.replica_groups}

    @property
    def replica_span(self) -> tuple[int, int]:
        """The fewest and the most replicas the service may run (equal without autoscaling)."""
        groups = self.replica_groups
        return sum(g.size.min or 0 for g in groups), sum(g.size.max or 0 for g in groups)

    @property
    def total_replicas(self) -> int:
        return sum(self.group_counts.values())

    @property
    def router_group(self) -> ReplicaGroup | None:
        return next((g for g in self.replica_groups if g.router is not None), None)

    def for_group(self, name: str) -> ServiceConfiguration:
        """What one group's replicas run: the group's fields over the service's (as dstack's
        ServiceJobConfigurator): its commands, resources and image source; the rest is shared."""
        if self.groups is None:
            return self
        group = next(g for g in self.replica_groups if g.name == name)
        update: dict[str, Any] = {
            "groups": None,
            "replicas": group.size,
            "scaling": group.scaling,
            "commands": group.commands,
            "resources": group.resources,
        }
        update.update(
            {key: getattr(group, key) for key in ("image", "python", "nvcc") if getattr(group, key)}
        )
        if group.docker:
            update["docker"] = True
        if group.privileged is not None:
            update["privileged"] = group.privileged
        router = self.router_group
        if router is not None and router.name != name and self.probes is None:
            update["probes"] = []  # dstack: only the router gets the default model probe
        return self.model_copy(update=update)

    def problems(self) -> list[tuple[Loc, str]]:
        """Rules that span fields, each with the path it is about."""
        found = cross_field_problems(
            self.image, self.python, set(self.environment), list(enumerate(self.probes or []))
        )
        found += mount_problems(self.volumes) + size_problems(self.replica_span[1])
        return found + service_problems(self)

    @property
    def environment(self) -> dict[str, str | None]:
        """`env` as a mapping; None marks a bare name taken from the caller's environment."""
        result: dict[str, str | None] = {}
        for entry in self.env:
            name, sep, value = entry.partition("=")
            result[name] = value if sep else None
        return result

    def effective_probes(self) -> list[ProbeConfig]:
        """The configured probes, or dstack's default chat probe when `model` is set and
        `probes` is omitted."""
        if self.probes is not None:
            return list(self.probes)
        if self.model is None:
            return []
        import json  # here: only model services need it, and `validate` need not load it

        body = json.dumps(
            {
                "model": self.model.name,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1,
            }
        )
        return [
            ProbeConfig(
                type="http",
                url=self.model.prefix.rstrip("/") + "/chat/completions",
                method="post",
                headers=[HTTPHeader(name="Content-Type", value="application/json")],
                body=body,
                timeout=30,
            )
        ]

    # dstack cloud settings: accepted and ignored on one machine.
    gateway: bool | str | None = ignored_field("Gateway to publish the service through.")
    strip_prefix: bool | None = ignored_field("Strip the `/proxy/services/...` prefix.")
    https: bool | Literal["auto"] | None = ignored_field("Serve over HTTPS.")
    rate_limits: list[Any] | None = ignored_field("Gateway rate limits.")
    priority: int | None = ignored_field("Run priority.")
    repos: list[Any] | None = ignored_field("Repositories to clone.")
    files: list[Any] | None = ignored_field("Files to upload.")
    single_branch: bool | None = ignored_field("Clone a single branch.")
    backends: list[str] | None = ignored_field("Cloud backends.")
    regions: list[str] | None = ignored_field("Cloud regions.")
    availability_zones: list[str] | None = ignored_field("Availability zones.")
    instance_types: list[str] | None = ignored_field("Instance types.")
    reservation: str | None = ignored_field("Capacity reservation.")
    spot_policy: Literal["spot", "on-demand", "auto"] | None = ignored_field("Spot instance policy.")
    max_duration: Any = ignored_field("Maximum run duration.")
    max_price: float | int | None = ignored_field("Maximum price per hour.")
    creation_policy: Literal["reuse", "reuse-or-create"] | None = ignored_field("Instance creation policy.")
    idle_duration: Any = ignored_field("Idle instance duration.")
    utilization_policy: dict[str, Any] | None = ignored_field("GPU utilization policy.")
    startup_order: str | None = ignored_field("Startup order of a multi-node run.")
    stop_criteria: str | None = ignored_field("Stop criteria of a multi-node run.")
    schedule: Any = ignored_field("Cron schedule.")
    fleets: list[Any] | None = ignored_field("Fleets to run on.")
    instances: list[Any] | None = ignored_field("Instances to run on.")
    tags: dict[str, str] | None = ignored_field("Cloud resource tags.")
    backend_options: dict[str, Any] | None = ignored_field("Backend options.")


def cross_field_problems(
    image: object, python: object, env_names: set[str] | None, probes: list[tuple[int, ProbeConfig]]
) -> list[tuple[Loc, str]]:
    """Rules that span fields, each with the path it is about.

    Takes parts rather than a whole model so that the loader can also apply them to a file
    that has other errors (`env_names` None: `env` is unreadable, skip the reference check).
    """
    found: list[tuple[Loc, str]] = []
    if image and python:
        found.append((("python",), "`image` and `python` exclude each other; keep one of them"))
    seen: dict[tuple[Any, ...], int] = {}
    for index, probe in probes:
        where: Loc = ("probes", index)
        if probe.body is not None and probe.method in ("get", "head"):
            if "method" in probe.model_fields_set:
                message = f"a request body is not allowed with method {probe.method}"
            else:
                message = "a request body needs a method such as `method: post` (the default is get)"
            found.append(((*where, "body"), message))
        if probe.identity() in seen:
            found.append((where, f"duplicates probes[{seen[probe.identity()]}]"))
        seen.setdefault(probe.identity(), index)
        if env_names is None:
            continue
        texts: list[tuple[Loc, str]] = [((*where, "url"), probe.url)]
        texts += [((*where, "headers", i, "value"), h.value) for i, h in enumerate(probe.headers)]
        if probe.body is not None:
            texts.append(((*where, "body"), probe.body))
        for path, text in texts:
            for ref in references(text, PROBE_NAMESPACES):
                if ref.name not in env_names:
                    found.append(
                        (
                            path,
                            f"{ref} refers to {ref.name!r}, which `env` does not define; "
                            f"add `- {ref.name}` to env",
                        )
                    )
    return found


IGNORED_FIELDS = frozenset(
    name
    for name, info in ServiceConfiguration.model_fields.items()
    if info.description and info.description.endswith("ignored here.")
)
