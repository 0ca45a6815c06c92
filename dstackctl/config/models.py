"""Pydantic models of a dstack `type: service` file, as dstack accepts it.

Fields that mean something on one machine are typed precisely; dstack's cloud settings are
accepted (loosely typed) so the same file runs on dstack and here, and the loader warns that
they are ignored. Cross-field rules that need a precise path live in `ServiceConfiguration.problems`.
"""

from __future__ import annotations

import json
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    field_validator,
)

from dstackctl.config.gpu import GpuSpec, parse_gpu_spec
from dstackctl.config.interpolation import references
from dstackctl.config.issues import Loc
from dstackctl.config.units import (
    Range,
    format_duration,
    format_memory_gb,
    parse_count_range,
    parse_duration,
    parse_memory_gb,
    parse_memory_range,
)

MAX_PROBES = 10
PROBE_NAMESPACES = ("env",)
SECRET_NAMESPACES = ("secrets", "env")
# \Z, not $: `$` also matches before a final line break, and "name\n" is not a name.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
RUN_NAME = re.compile(r"^[a-z][a-z0-9-]{1,40}\Z")
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
PythonVersion = Literal["3.9", "3.10", "3.11", "3.12", "3.13", "3.14"]
PYTHON_VERSIONS: tuple[str, ...] = typing.get_args(PythonVersion)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


Duration = Annotated[
    int,
    PlainValidator(parse_duration, json_schema_input_type=int | str),
    PlainSerializer(format_duration, return_type=str),
]
CountRange = Annotated[
    Range[int],
    PlainValidator(lambda v: parse_count_range(v), json_schema_input_type=int | str | dict[str, Any]),
    PlainSerializer(str, return_type=str),
]
MemoryRange = Annotated[
    Range[float],
    PlainValidator(parse_memory_range, json_schema_input_type=int | float | str | dict[str, Any]),
    PlainSerializer(lambda r: r.render(format_memory_gb), return_type=str),
]
MemorySize = Annotated[
    float,
    PlainValidator(parse_memory_gb, json_schema_input_type=int | float | str),
    PlainSerializer(format_memory_gb, return_type=str),
]
Gpu = Annotated[
    GpuSpec,
    PlainValidator(parse_gpu_spec, json_schema_input_type=int | str | dict[str, Any]),
    PlainSerializer(lambda spec: spec.to_dict(), return_type=dict[str, Any]),
]


# --- probes -------------------------------------------------------------------------------


def _check_url(url: str) -> str:
    if not url.startswith("/"):
        raise ValueError(f"a probe url must start with '/', got {url!r}")
    if not url.isprintable():
        raise ValueError("a probe url must contain printable characters only")
    references(url, PROBE_NAMESPACES)
    return url


def _check_interpolated(text: str) -> str:
    references(text, PROBE_NAMESPACES)
    return text


def _check_header_name(name: str) -> str:
    if not HEADER_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid HTTP header name")
    return name


class HTTPHeader(Strict):
    name: Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_check_header_name)] = Field(
        description="Header name, e.g. `X-API-Key`."
    )
    value: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(_check_interpolated)] = Field(
        description="Header value; may use `${{ env.NAME }}` from the service's `env`."
    )


class ProbeConfig(Strict):
    type: Literal["http"] = Field(description="The probe type; only `http` exists.")
    url: Annotated[str, Field(max_length=2048), AfterValidator(_check_url)] = Field(
        "/",
        description="Path to request on the replica, starting with `/`; may use `${{ env.NAME }}`.",
    )
    method: Literal["get", "post", "put", "delete", "patch", "head"] = Field(
        "get", description="HTTP method, lower-case."
    )
    headers: list[HTTPHeader] = Field(
        default_factory=list, max_length=16, description="Request headers (at most 16)."
    )
    body: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(_check_interpolated)] | None = (
        Field(
            None,
            description="Request body; not allowed with `get` or `head`. May use `${{ env.NAME }}`.",
        )
    )
    timeout: Duration = Field(10, description="How long to wait for a response (1s to 5m).")
    interval: Duration = Field(
        15, description="Time from the end of one probe to the start of the next (>= 1s)."
    )
    ready_after: int = Field(
        1, ge=1, description="Consecutive successes needed before the replica counts as ready."
    )
    until_ready: bool = Field(False, description="Stop probing once the replica is ready.")

    @field_validator("timeout")
    @classmethod
    def _timeout_limits(cls, value: int) -> int:
        if not 1 <= value <= 300:
            raise ValueError(f"a probe timeout must be between 1s and 5m, got {format_duration(value)}")
        return value

    @field_validator("interval")
    @classmethod
    def _interval_limits(cls, value: int) -> int:
        if value < 1:
            raise ValueError("a probe interval must be at least 1s")
        return value

    def identity(self) -> tuple[Any, ...]:
        return (self.url, self.method, tuple((h.name, h.value) for h in self.headers), self.body)


# --- service parts ------------------------------------------------------------------------


def _port_from_scalar(value: object) -> object:
    if isinstance(value, dict):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return {"container_port": value}
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return {"container_port": int(text)}
        local, sep, container = text.partition(":")
        if sep and container.strip().isdigit():
            local = local.strip()
            if local == "*" or local == "":
                return {"container_port": int(container)}
            if local.isdigit():
                return {"local_port": int(local), "container_port": int(container)}
    if isinstance(value, bool):
        shown = str(value).lower()
    elif isinstance(value, (int, float, str)):
        shown = repr(value[:60] if isinstance(value, str) else value)
    else:
        shown = "a list" if isinstance(value, list) else type(value).__name__
    raise ValueError(f'expected a port such as 8000 or "8080:8000" (LOCAL:CONTAINER), got {shown}')


Port = Annotated[int, Field(ge=1, le=65535)]


class PortMapping(Strict):
    container_port: Port = Field(description="The port the application listens on in the container.")
    local_port: Port | None = Field(
        None,
        description="The port of the service endpoint on 127.0.0.1 (default: the container port).",
    )


def _model_from_scalar(value: object) -> object:
    return {"name": value} if isinstance(value, str) else value


class ModelSpec(Strict):
    type: Literal["chat"] = Field("chat", description="The model type; dstack knows `chat`.")
    name: str = Field(
        min_length=1,
        description="The model name clients send, e.g. `meta-llama/Meta-Llama-3.1-8B-Instruct`.",
    )
    format: Literal["openai", "tgi"] = Field("openai", description="The API format the replica speaks.")
    prefix: str = Field("/v1", description="Path prefix of the OpenAI-compatible API.")
    chat_template: str | None = Field(None, description="For the `tgi` format: a chat template.")
    eos_token: str | None = Field(None, description="For the `tgi` format: the end-of-sequence token.")


def _cpu_from_scalar(value: object) -> object:
    if isinstance(value, str) and ":" in value:
        arch, _, count = value.partition(":")
        if arch.strip().lower() not in ("x86", "arm"):
            raise ValueError(f"expected a CPU count such as 4, 2..8 or x86:4, got {value!r}")
        return count
    if isinstance(value, dict):
        extra = set(value) - {"arch", "count", "min", "max"}
        if extra:
            raise ValueError(f"unknown CPU spec key {sorted(map(str, extra))[0]!r}")
        return value.get("count", {k: v for k, v in value.items() if k in ("min", "max")})
    return value


class Resources(Strict):
    cpu: (
        Annotated[
            CountRange,
            BeforeValidator(_cpu_from_scalar, json_schema_input_type=int | str | dict[str, Any]),
        ]
        | None
    ) = Field(
        None,
        description="CPU cores per replica: `4`, `2..8`, `x86:4`. A maximum becomes a Docker CPU limit.",
    )
    memory: MemoryRange | None = Field(
        None,
        description="Memory per replica: `16GB`, `8GB..`. A maximum becomes a Docker memory limit.",
    )
    shm_size: MemorySize | None = Field(None, description="Size of /dev/shm, e.g. `16GB`.")
    gpu: Gpu | None = Field(
        None,
        description="GPUs per replica: `1`, `A100:2`, `24GB..48GB`, `nvidia:A10G,L4:1..2`, or a mapping.",
    )
    disk: MemoryRange | None = Field(None, description="Disk size; ignored on one machine.")


def _volume_from_scalar(value: object) -> object:
    if isinstance(value, str):
        source, sep, target = value.partition(":")
        if not sep or not source or not target:
            raise ValueError(f"expected a volume such as /host/path:/container/path, got {value!r}")
        read_only = False
        if target.endswith(":ro"):
            target, read_only = target[:-3], True
        return {"source": source, "path": target, "read_only": read_only}
    if isinstance(value, dict):
        mapped = dict(value)
        for key in ("instance_path", "name"):
            if key in mapped:
                mapped["source"] = mapped.pop(key)
        return mapped
    return value


class VolumeMount(Strict):
    source: str = Field(
        min_length=1,
        description="A host path (starting with `/` or `~`) to bind, or a Docker volume name.",
    )
    path: str = Field(min_length=1, description="Where it appears in the container (absolute path).")
    read_only: bool = Field(False, description="Mount read-only.")
    optional: bool = Field(False, description="dstack: skip the mount when the host path is missing.")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"the container path must be absolute, got {value!r}")
        return value

    @property
    def is_host_path(self) -> bool:
        return self.source.startswith(("/", "~", "."))


class RegistryAuth(Strict):
    username: str = Field(description="Registry user name; may use `${{ secrets.NAME }}`.")
    password: str = Field(description="Registry password or token; may use `${{ secrets.NAME }}`.")


RetryEvent = Literal["no-capacity", "interruption", "error"]


def _retry_from_scalar(value: object) -> object:
    if value is True:
        return {}
    if value is False:
        return None
    return value


class RetryPolicy(Strict):
    on_events: list[RetryEvent] = Field(
        default_factory=lambda: list(typing.get_args(RetryEvent)),
        description="Events that trigger a restart; locally `error` (a replica that exits) matters.",
    )
    duration: Duration | None = Field(None, description="How long to keep retrying.")


def _env_to_list(value: object) -> object:
    """The dict form (`NAME: value`) becomes the list form (`NAME=value`); null means pass-through."""
    if isinstance(value, dict):
        items: list[object] = []
        for name, item in value.items():
            if item is None:
                items.append(str(name))
            elif isinstance(item, (str, int, float)) and not isinstance(item, bool):
                items.append(f"{name}={item}")
            elif isinstance(item, bool):
                items.append(f"{name}={str(item).lower()}")
            else:
                raise ValueError(f"the value of {name!r} must be a string or a number")
        return items
    return value


def _check_env_entry(entry: str) -> str:
    name, sep, value = entry.partition("=")
    if not ENV_NAME.match(name):
        # `TOKEN:abc` or `TOKEN abc` may carry a secret: quote only a plain word.
        if re.fullmatch(r"\w{1,64}", name):
            shown = f"{name!r} is not a valid variable name"
        else:
            shown = "not a valid variable name (not repeated here, as it may hold a value)"
        raise ValueError(
            f"{shown}: use letters, digits and _, not starting with a digit; write NAME=value or a bare NAME"
        )
    if sep:
        references(value, SECRET_NAMESPACES)
    return entry


def _check_env_unique(entries: list[str]) -> list[str]:
    seen: set[str] = set()
    for entry in entries:
        name = entry.partition("=")[0]
        if name in seen:
            raise ValueError(f"{name!r} is set twice")
        seen.add(name)
    return entries


EnvEntry = Annotated[str, AfterValidator(_check_env_entry)]


def _python_version(value: object) -> object:
    if isinstance(value, float) and not isinstance(value, bool):
        text = repr(value)
        return "3.10" if text == "3.1" else text
    return value


def check_run_name(name: str) -> str:
    if not RUN_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a valid run name: 2 to 41 characters, lower-case letters, digits "
            f"and '-', starting with a letter"
        )
    return name


def _refuse_groups(value: object) -> object:
    if value:
        raise ValueError(
            "replica groups are not supported by dstackctl yet; write one service file per group"
        )
    return value


def _replicas(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"replicas cannot be negative, got {value}")
        return value
    count = parse_count_range(value, "a replica count")
    if count.min is None or count.min != count.max:
        raise ValueError(
            f"a replica range ({count}) needs autoscaling, which dstackctl does not have yet; "
            f"set a fixed number such as `replicas: 2`"
        )
    return count.min


def _ignored(description: str) -> Any:
    return Field(None, description=f"{description} Accepted for dstack compatibility; ignored here.")


Replicas = Annotated[
    int, PlainValidator(_replicas, json_schema_input_type=int | str | dict[str, Any]), PlainSerializer(int)
]


def _off_duration(value: object) -> int | str | None:
    """dstack's `off` duration: `off` (which YAML reads as false) turns it off, `true` is the default."""
    if value == "off" or value is False:
        return "off"
    if value is True:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(f"expected a duration such as 30s or 5m, or off, got {value!r}") from None


OffDuration = Annotated[
    int | Literal["off"],
    PlainValidator(_off_duration, json_schema_input_type=int | str | bool),
    PlainSerializer(lambda v: v if v == "off" else format_duration(v), return_type=str),
]


class ServiceConfiguration(Strict):
    """A dstack service: replicas of one container behind one endpoint, gated by probes."""

    type: Literal["service"] = Field(description="Always `service`.")
    name: Annotated[str, AfterValidator(check_run_name)] | None = Field(
        None, description="The run name (default: the file name or `-n`)."
    )
    image: str | None = Field(None, min_length=1, description="Docker image of the replicas.")
    python: (
        Annotated[
            PythonVersion, BeforeValidator(_python_version, json_schema_input_type=PythonVersion | float)
        ]
        | None
    ) = Field(
        None,
        description="Use dstack's base image with a venv of this Python version (excludes `image`).",
    )
    nvcc: bool | None = Field(
        None, description="With `python`: use the base image that has the CUDA compiler."
    )
    commands: list[str] = Field(default_factory=list, description="Shell commands, joined with ` && `.")
    setup: list[str] = Field(default_factory=list, description="Deprecated: commands run before `commands`.")
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
            _env_to_list,
            json_schema_input_type=list[str] | dict[str, str | int | float | bool | None],
        ),
        AfterValidator(_check_env_unique),
    ] = Field(
        default_factory=list,
        description="Variables: `NAME=value`, or a bare `NAME` taken from your environment; or a mapping.",
    )
    port: Annotated[
        PortMapping,
        BeforeValidator(_port_from_scalar, json_schema_input_type=int | str | PortMapping),
    ] = Field(
        description="The port the app listens on (`8000`), or `LOCAL:CONTAINER` to set the endpoint's port.",
    )
    replicas: Replicas = Field(1, description="How many replicas to run (a fixed number).")
    resources: Resources = Field(default_factory=Resources, description="What each replica needs.")
    volumes: list[
        Annotated[
            VolumeMount,
            BeforeValidator(_volume_from_scalar, json_schema_input_type=str | VolumeMount | dict[str, Any]),
        ]
    ] = Field(default_factory=list, description="Mounts: `/host/path:/container/path[:ro]` or a mapping.")
    model: (
        Annotated[ModelSpec, BeforeValidator(_model_from_scalar, json_schema_input_type=str | ModelSpec)]
        | None
    ) = Field(None, description="The model served; without `probes` it adds a chat-completion probe.")
    probes: list[ProbeConfig] | None = Field(
        None, max_length=MAX_PROBES, description="Readiness probes (at most 10); `[]` means none."
    )
    registry_auth: RegistryAuth | None = Field(None, description="Credentials to pull a private image.")
    retry: Annotated[
        RetryPolicy | None,
        BeforeValidator(_retry_from_scalar, json_schema_input_type=bool | RetryPolicy),
    ] = Field(None, description="Restart replicas that exit: `true` or `{on_events, duration}`.")
    stop_duration: OffDuration | None = Field(
        None, description="Grace period between SIGTERM and SIGKILL when stopping a replica."
    )
    groups: Annotated[Any, AfterValidator(_refuse_groups)] = Field(
        None, description="dstack replica groups; not supported here."
    )

    def problems(self) -> list[tuple[Loc, str]]:
        """Rules that span fields, each with the path it is about."""
        return cross_field_problems(
            self.image, self.python, set(self.environment), list(enumerate(self.probes or []))
        )

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
    gateway: bool | str | None = _ignored("Gateway to publish the service through.")
    strip_prefix: bool | None = _ignored("Strip the `/proxy/services/...` prefix.")
    https: bool | Literal["auto"] | None = _ignored("Serve over HTTPS.")
    auth: bool | None = _ignored("Require dstack authorization.")
    scaling: dict[str, Any] | None = _ignored("Autoscaling rules.")
    rate_limits: list[Any] | None = _ignored("Gateway rate limits.")
    priority: int | None = _ignored("Run priority.")
    docker: bool | None = _ignored("Docker-in-Docker.")
    repos: list[Any] | None = _ignored("Repositories to clone.")
    files: list[Any] | None = _ignored("Files to upload.")
    single_branch: bool | None = _ignored("Clone a single branch.")
    backends: list[str] | None = _ignored("Cloud backends.")
    regions: list[str] | None = _ignored("Cloud regions.")
    availability_zones: list[str] | None = _ignored("Availability zones.")
    instance_types: list[str] | None = _ignored("Instance types.")
    reservation: str | None = _ignored("Capacity reservation.")
    spot_policy: Literal["spot", "on-demand", "auto"] | None = _ignored("Spot instance policy.")
    max_duration: Any = _ignored("Maximum run duration.")
    max_price: float | int | None = _ignored("Maximum price per hour.")
    creation_policy: Literal["reuse", "reuse-or-create"] | None = _ignored("Instance creation policy.")
    idle_duration: Any = _ignored("Idle instance duration.")
    utilization_policy: dict[str, Any] | None = _ignored("GPU utilization policy.")
    startup_order: str | None = _ignored("Startup order of a multi-node run.")
    stop_criteria: str | None = _ignored("Stop criteria of a multi-node run.")
    schedule: Any = _ignored("Cron schedule.")
    fleets: list[Any] | None = _ignored("Fleets to run on.")
    instances: list[Any] | None = _ignored("Instances to run on.")
    tags: dict[str, str] | None = _ignored("Cloud resource tags.")
    backend_options: dict[str, Any] | None = _ignored("Backend options.")


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
