"""Which Docker engine to talk to: the one the docker CLI would use; and the words for an
engine that cannot be reached. Free of docker-py, which `run` need not load (docker_ping.py)."""

from __future__ import annotations

import os

from dstackctl.errors import DstackctlError


class DockerAddressError(DstackctlError):
    """DOCKER_HOST/DOCKER_CONTEXT name no engine that can be used."""


class DockerError(DstackctlError):
    """The engine refused or failed an operation."""


DEFAULT_SOCKET = "unix:///var/run/docker.sock"
PERMISSION_DENIED = (
    "permission denied on the Docker socket; add your user to the `docker` group "
    "(then log in again) or run as root"
)


def not_running(tried: str | None) -> DockerError:
    return DockerError(
        f"Docker is not running (cannot reach {tried or 'its socket'}); start it with "
        f"`sudo systemctl start docker` or `sudo dockerd &`, or point DOCKER_HOST or "
        f"DOCKER_CONTEXT at a running engine"
    )


def engine_address() -> str | None:
    """The context's engine address; None where docker-py's own DOCKER_HOST/socket rule holds."""
    host, context = os.environ.get("DOCKER_HOST"), os.environ.get("DOCKER_CONTEXT")
    if host and context:
        raise DockerAddressError(
            "DOCKER_HOST and DOCKER_CONTEXT are both set; unset one (the docker CLI refuses both too)"
        )
    if host or not (context or _config_may_name_a_context()):
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


def _config_may_name_a_context() -> bool:
    """Whether the docker CLI's config file (where docker-py looks for it) could name a
    current context; checked without docker-py, which costs ~0.1 s to import."""
    config_dir = os.environ.get("DOCKER_CONFIG")
    home = os.path.expanduser("~")
    candidates = [os.path.join(config_dir, "config.json")] if config_dir else []
    candidates += [os.path.join(home, ".docker", "config.json"), os.path.join(home, ".dockercfg")]
    for path in candidates:
        if os.path.exists(path):
            try:
                with open(path, "rb") as file:
                    return b"currentContext" in file.read()
            except OSError:
                return True  # let docker-py read it and decide
    return False
