"""spec.json: the desired state of one service, written by the CLI alone and read by its agent.

The agent never writes it: what it makes of the spec (the rollout's outcome, a rollback, the
deployment it serves) is observed state, in state.json (see status.py). Kept free of pydantic:
`ps` reads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dstackctl.labels import DEFAULT_GROUP

DEFAULT_ROLLOUT_TIMEOUT = 600
# What a container's label keeps of spec.json, to rebuild a lost store (`recover`).
SPEC_RECORD_KEYS = (
    "name",
    "run_id",
    "config",
    "config_file",
    "config_dir",
    "config_hash",
    "deployment_num",
    "replicas",
    "group_replicas",
    "restart",
    "submitted_at",
    "probe_urls",
    "endpoint_port",
)


def stored_groups(config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The replica groups of a stored config (`groups:`, or `replicas:` given as a list)."""
    groups = config.get("groups")
    if groups is None and isinstance(config.get("replicas"), list):
        groups = config["replicas"]
    return [g for g in groups if isinstance(g, dict)] if isinstance(groups, list) else None


@dataclass(frozen=True)
class DeploymentRecord:
    """One configuration of the service: config (env reduced to names), hash, replica counts.

    `restart`: a redeploy of the same config, which replaces every replica; any other
    deployment keeps the replicas of groups it does not change.
    """

    number: int
    config_hash: str
    replicas: int
    config: dict[str, Any]
    probe_urls: tuple[str, ...] = ()
    group_replicas: dict[str, int] = field(default_factory=dict)
    restart: bool = False

    @property
    def group_counts(self) -> dict[str, int]:
        """Replicas per group (a record from before groups has one group, `0`)."""
        return dict(self.group_replicas) or {DEFAULT_GROUP: self.replicas}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "probe_urls": list(self.probe_urls), "group_replicas": self.group_counts}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeploymentRecord:
        return cls(
            number=int(data.get("number", data.get("deployment_num", 0))),
            config_hash=str(data.get("config_hash", "")),
            replicas=int(data.get("replicas", 0)),
            config=dict(data.get("config") or {}),
            probe_urls=tuple(data.get("probe_urls") or ()),
            group_replicas={str(k): int(v) for k, v in (data.get("group_replicas") or {}).items()},
            restart=bool(data.get("restart", False)),
        )


@dataclass(frozen=True)
class RolloutRequest:
    """The user asked to replace `from_deployment` by `to_deployment`, each new replica to be
    ready within `timeout` seconds."""

    from_deployment: int
    to_deployment: int
    timeout: int = DEFAULT_ROLLOUT_TIMEOUT
    started_at: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RolloutRequest | None:
        if not data or "to_deployment" not in data:
            return None
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass(frozen=True)
class SpecDocument:
    name: str
    run_id: str
    current: DeploymentRecord
    desired: str = "running"  # or "stopped"
    config_file: str | None = None
    config_dir: str | None = None
    submitted_at: str | None = None
    endpoint_port: int | None = None
    previous: DeploymentRecord | None = None  # what a rollout replaces, to roll back to
    rollout: RolloutRequest | None = None
    # How long a request waits for a replica of a service scaled to zero before a 503.
    wake_timeout: int = DEFAULT_ROLLOUT_TIMEOUT

    @property
    def running(self) -> bool:
        return self.desired == "running"

    def record(self) -> dict[str, Any]:
        """The part of the spec that every container carries in a label."""
        document = self.to_json()
        return {key: document.get(key) for key in SPEC_RECORD_KEYS}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "run_id": self.run_id,
            "desired": self.desired,
            "config": self.current.config,
            "config_file": self.config_file,
            "config_dir": self.config_dir,
            "config_hash": self.current.config_hash,
            "deployment_num": self.current.number,
            "replicas": self.current.replicas,
            "group_replicas": self.current.group_counts,
            "restart": self.current.restart,
            "submitted_at": self.submitted_at,
            "probe_urls": list(self.current.probe_urls),
            "endpoint_port": self.endpoint_port,
            "previous": self.previous.to_json() if self.previous else None,
            "rollout": asdict(self.rollout) if self.rollout else None,
            "wake_timeout": self.wake_timeout,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpecDocument:
        previous = data.get("previous")
        return cls(
            name=str(data.get("name", "")),
            run_id=str(data.get("run_id", "")),
            current=DeploymentRecord.from_json(data),
            desired=str(data.get("desired", "running")),
            config_file=data.get("config_file"),
            config_dir=data.get("config_dir"),
            submitted_at=data.get("submitted_at"),
            endpoint_port=data.get("endpoint_port"),
            previous=DeploymentRecord.from_json(previous) if previous else None,
            rollout=RolloutRequest.from_json(data.get("rollout")),
            wake_timeout=int(data.get("wake_timeout") or DEFAULT_ROLLOUT_TIMEOUT),
        )
