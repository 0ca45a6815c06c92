"""Field types and the small models a service file is made of (ports, resources, volumes...)."""

from __future__ import annotations

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
from dstackctl.config.group_refs import has_refs
from dstackctl.config.interpolation import references
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


def empty_list() -> list[Any]:
    """The default factory of list fields. Not `list`: pydantic reads each default factory's
    signature, and the first builtin's costs ~4 ms of every `validate` (tokenizing its text
    signature)."""
    return []


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


def port_from_scalar(value: object) -> object:
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
            local = local.strip()  # dstack refuses `*:8000` (a task's form) for a service
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


def model_from_scalar(value: object) -> object:
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


def volume_from_scalar(value: object) -> object:
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


def retry_from_scalar(value: object) -> object:
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


def env_to_list(value: object) -> object:
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
    if sep and has_refs(value):
        raise ValueError("refers to a replica's address, which works in `commands` only (as in dstack)")
    if sep:
        references(value, SECRET_NAMESPACES)
    return entry


def check_env_unique(entries: list[str]) -> list[str]:
    seen: set[str] = set()
    for entry in entries:
        name = entry.partition("=")[0]
        if name in seen:
            raise ValueError(f"{name!r} is set twice")
        seen.add(name)
    return entries


EnvEntry = Annotated[str, AfterValidator(_check_env_entry)]


def python_version(value: object) -> object:
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


def ignored_field(description: str) -> Any:
    return Field(None, description=f"{description} Accepted for dstack compatibility; ignored here.")


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
