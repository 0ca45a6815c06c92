"""The `probes:` entries of a service file."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
)

from dstackctl.config.fields import HEADER_NAME, PROBE_NAMESPACES, Duration, Strict, empty_list
from dstackctl.config.interpolation import references
from dstackctl.config.units import (
    format_duration,
)


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
        default_factory=empty_list, max_length=16, description="Request headers (at most 16)."
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
