"""Which Docker engine to talk to: the one the docker CLI would use."""

from __future__ import annotations

import os

from dstackctl.errors import DstackctlError


class DockerAddressError(DstackctlError):
    """DOCKER_HOST/DOCKER_CONTEXT name no engine that can be used."""


DEFAULT_SOCKET = "unix:///var/run/docker.sock"


def engine_address() -> str | None:
    """The context's engine address; None where docker-py's own DOCKER_HOST/socket rule holds."""
    host, context = os.environ.get("DOCKER_HOST"), os.environ.get("DOCKER_CONTEXT")
    if host and context:
        raise DockerAddressError(
            "DOCKER_HOST and DOCKER_CONTEXT are both set; unset one (the docker CLI refuses both too)"
        )
    if host:
        return None
    from docker.context import ContextAPI
    from docker.context.config import get_current_context_name

    name = context or get_current_context_name()
    if not name or name == "default":
        return None
    found = ContextAPI.get_context(name)
    if found is None:
        raise DockerAddressError(
            f"the Docker context {name!r} does not exist; `docker context ls` lists them"
        )
    return str(found.Host) if found.Host else None
