"""What a service may reach on this machine: its mounts, privileges and size.

dstack runs replicas on machines of their own; here they share the user's machine, so a mount
of `/` or of the Docker socket, or `privileged: true`, hands a replica the host. Such files
stay valid (they run on dstack too) but `validate` and `run` say what they give away. What
cannot work is refused: two volumes at one container path (Docker refuses the container) and
more replicas than one machine can hold.
"""

from __future__ import annotations

import os
from typing import Any

Loc = tuple[str | int, ...]

# The most replicas one service may ask for here (a replica range counts its maximum).
MAX_REPLICAS = 1000
_DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
_HOST_SECRETS = (
    "/etc",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/sudoers",
    "/root",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
)


def mount_problems(volumes: list[Any]) -> list[tuple[Loc, str]]:
    """Two volumes at the same container path: Docker would refuse the container."""
    found: list[tuple[Loc, str]] = []
    first: dict[str, int] = {}
    for index, volume in enumerate(volumes):
        path = os.path.normpath(volume.path)
        if path in first:
            found.append(
                (
                    ("volumes", index),
                    f"{path} is already the path of volume {first[path] + 1}; "
                    "give each volume its own path in the container",
                )
            )
        first.setdefault(path, index)
    return found


def size_problems(most: int) -> list[tuple[Loc, str]]:
    if most <= MAX_REPLICAS:
        return []
    return [
        (
            ("replicas",),
            f"{most} replicas is more than one machine can run; dstackctl runs at most "
            f"{MAX_REPLICAS} per service",
        )
    ]


def exposure_warnings(config: Any) -> list[tuple[Loc, str]]:
    """What the file gives its replicas of this machine, one warning each."""
    found: list[tuple[Loc, str]] = []
    for index, volume in enumerate(config.volumes):
        if volume.is_host_path:
            found += [(("volumes", index), message) for message in _host_path_risks(volume.source)]
    if config.privileged:
        found.append((("privileged",), _PRIVILEGED))
    for index, group in enumerate(config.groups or []):
        if group.privileged:
            found.append((("groups", index, "privileged"), _PRIVILEGED))
    return found


_PRIVILEGED = (
    "runs the replicas privileged: they get every capability and device of this machine "
    "(root on the host); remove it unless they need that"
)


def _host_path_risks(source: str) -> list[str]:
    path = os.path.normpath(os.path.expanduser(source))
    if path == "/":
        return [
            "mounts the root of this machine: the replica can read and change every file; "
            "mount only the folder that it needs"
        ]
    if path in _DOCKER_SOCKETS or path.endswith("/docker.sock"):
        return [
            "gives the replica the Docker socket: it can start root containers on this machine "
            "(take it over); remove the volume unless that is its job"
        ]
    if path in _HOST_SECRETS or path.startswith(("/etc/shadow", "/etc/sudoers", "/root/")) or "/.ssh" in path:
        return [
            f"mounts {path}, which holds this machine's secrets or devices; mount only what the replica needs"
        ]
    return []
