"""What Docker says about one replica container, read from its labels and inspect data.

Pure: no docker-py import, so the agent's typed state and the tests can use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dstackctl.labels import (
    DEFAULT_GROUP,
    LABEL_CONFIG_HASH,
    LABEL_DEPLOYMENT,
    LABEL_GPUS,
    LABEL_GROUP,
    LABEL_GROUP_HASH,
    LABEL_REPLICA,
)


@dataclass(frozen=True)
class Replica:
    """What Docker says about one replica container."""

    id: str
    name: str
    labels: dict[str, str]
    status: str  # Docker's: created, running, exited, dead, paused, restarting, removing
    exit_code: int | None
    oom_killed: bool
    host_port: int | None
    started_at: str | None
    ip_address: str | None  # the container's own, on its network (None unless running)
    container_port: int | None

    @property
    def group(self) -> str:
        return self.labels.get(LABEL_GROUP, DEFAULT_GROUP)

    @property
    def replica_num(self) -> int:
        return int(self.labels.get(LABEL_REPLICA, "-1"))

    @property
    def deployment_num(self) -> int:
        return int(self.labels.get(LABEL_DEPLOYMENT, "0"))

    @property
    def config_hash(self) -> str:
        return self.labels.get(LABEL_CONFIG_HASH, "")

    @property
    def group_hash(self) -> str:
        return self.labels.get(LABEL_GROUP_HASH, "")

    @property
    def gpu_uuids(self) -> list[str]:
        value = self.labels.get(LABEL_GPUS, "")
        return value.split(",") if value else []

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Replica:
        state = attrs.get("State", {})
        labels = attrs.get("Config", {}).get("Labels") or {}
        host_port = container_port = None
        for port_key, bindings in (attrs.get("NetworkSettings", {}).get("Ports") or {}).items():
            for binding in bindings or []:
                if binding.get("HostPort"):
                    host_port = int(binding["HostPort"])
                    container_port = int(port_key.split("/")[0])
                    break
        status = state.get("Status", "unknown")
        return cls(
            id=attrs["Id"],
            name=attrs.get("Name", "").lstrip("/"),
            labels=labels,
            status=status,
            exit_code=state.get("ExitCode") if status in ("exited", "dead") else None,
            oom_killed=bool(state.get("OOMKilled")),
            host_port=host_port,
            started_at=_docker_time(state.get("StartedAt")),
            ip_address=_ip_address(attrs.get("NetworkSettings")) if status == "running" else None,
            container_port=container_port,
        )

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> Replica:
        """From a `containers` list entry of a running container (no inspect needed)."""
        ports = [p for p in summary.get("Ports") or [] if p.get("PublicPort")]
        running = summary.get("State") == "running"
        return cls(
            id=summary["Id"],
            name=(summary.get("Names") or ["/"])[0].lstrip("/"),
            labels=summary.get("Labels") or {},
            status=summary.get("State", "unknown"),
            exit_code=None,
            oom_killed=False,
            host_port=int(ports[0]["PublicPort"]) if ports else None,
            started_at=_epoch_time(summary.get("Created")),
            ip_address=_ip_address(summary.get("NetworkSettings")) if running else None,
            container_port=int(ports[0]["PrivatePort"]) if ports else None,
        )


def _ip_address(network_settings: dict[str, Any] | None) -> str | None:
    """The container's address on the first network that gave it one."""
    settings = network_settings or {}
    for network in (settings.get("Networks") or {}).values():
        if (network or {}).get("IPAddress"):
            return str(network["IPAddress"])
    return settings.get("IPAddress") or None


def _epoch_time(value: int | None) -> str | None:
    if not value:
        return None
    from datetime import datetime, timezone

    return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _docker_time(value: str | None) -> str | None:
    """Docker's nanosecond timestamps (`...T21:36:02.123456789Z`) to whole seconds in UTC."""
    if not value or value.startswith("0001-"):
        return None
    return value[:19] + "Z"
