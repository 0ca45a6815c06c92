"""What the agent is asked to run: spec.json and secrets.json, typed and validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstackctl.config.models import ServiceConfiguration
from dstackctl.config.probe_model import ProbeConfig
from dstackctl.config.probe_values import resolve_probes
from dstackctl.replica_spec import config_hash as hash_of
from dstackctl.service_token import read_token
from dstackctl.spec_document import DeploymentRecord, SpecDocument
from dstackctl.store import SECRETS, SPEC, Store

if TYPE_CHECKING:
    from dstackctl.agent.phases import ReplicaState
    from dstackctl.replica import Replica


@dataclass(frozen=True)
class GroupTarget:
    """One replica group of a deployment: how many, what they run, and its own hash."""

    name: str
    count: int
    config: ServiceConfiguration  # the service's config with this group's fields applied
    spec_hash: str  # changes only when what this group runs changes (not with counts)
    probes: list[ProbeConfig]
    probe_urls: list[str]  # as written, `${{ env.X }}` unexpanded: what `ps` may show

    @classmethod
    def load(cls, service: ServiceConfiguration, name: str, count: int, env: dict[str, str]) -> GroupTarget:
        config = service.for_group(name)
        runs = config.model_dump(mode="json", exclude={"replicas", "scaling", "groups"})
        return cls(
            name=name,
            count=count,
            config=config,
            spec_hash=hash_of({"group": name, "runs": runs}, env),
            probes=resolve_probes(config, env),
            probe_urls=[probe.url for probe in config.effective_probes()],
        )


@dataclass(frozen=True)
class Deployment:
    """One configuration the service runs, with its env values, groups and expanded probes."""

    number: int
    config_hash: str
    config: ServiceConfiguration
    env: dict[str, str]
    groups: dict[str, GroupTarget]
    restart: bool = False  # the same config again: nothing is kept from older deployments

    @classmethod
    def load(cls, record: DeploymentRecord, env: dict[str, str]) -> Deployment:
        config = ServiceConfiguration.model_validate(record.config)
        counts = record.group_counts
        return cls(
            number=record.number,
            config_hash=record.config_hash,
            config=config,
            env=env,
            groups={
                str(g.name): GroupTarget.load(config, str(g.name), counts.get(str(g.name), 0), env)
                for g in config.replica_groups
            },
            restart=record.restart,
        )

    @property
    def replicas(self) -> int:
        return sum(g.count for g in self.groups.values())

    @property
    def slots(self) -> list[tuple[str, int]]:
        """(group, replica number) of every replica this deployment wants, in dstack's order."""
        return [(g.name, num) for g in self.groups.values() for num in range(g.count)]

    def owns(self, group: str, deployment_num: int, config_hash: str, group_hash: str = "") -> bool:
        """A container is this deployment's when it was started for it, or (unless this is a
        restart) an older deployment started it in a group this deployment did not change."""
        target = self.groups.get(group)
        if target is None:
            return False
        if (deployment_num, config_hash) == (self.number, self.config_hash):
            return True
        # Only from older deployments: a rollback does not adopt what the failed one started.
        older = deployment_num < self.number
        return older and not self.restart and bool(group_hash) and group_hash == target.spec_hash

    def owns_replica(self, replica: Replica) -> bool:
        return self.owns(replica.group, replica.deployment_num, replica.config_hash, replica.group_hash)

    def owns_state(self, state: ReplicaState) -> bool:
        container = state.container
        if container is None:
            return state.key.deployment_num == self.number
        return self.owns(
            state.key.group, state.key.deployment_num, container.config_hash, container.group_hash
        )


@dataclass(frozen=True)
class Desired:
    spec: SpecDocument
    current: Deployment
    previous: Deployment | None
    registry_auth: dict[str, str] | None
    # From token.json when the current config has `auth: true`; kept out of repr (and logs).
    auth_token: str | None = field(default=None, repr=False)

    @property
    def auth(self) -> bool:
        return self.current.config.auth

    @property
    def config_dir(self) -> Path:
        return Path(self.spec.config_dir or "/")

    def deployment(
        self, group: str, deployment_num: int, config_hash: str, group_hash: str = ""
    ) -> Deployment | None:
        for deployment in (self.current, self.previous):
            if deployment is not None and deployment.owns(group, deployment_num, config_hash, group_hash):
                return deployment
        return None


class DesiredReader:
    """Reads the desired documents on every round; validates each configuration only once."""

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self._name = name
        self._cache: dict[tuple[int, str, tuple[tuple[str, int], ...]], Deployment] = {}

    def read(self) -> Desired | None:
        """None when the service is no longer wanted (stopped, or its record removed)."""
        data = self._store.read(self._name, SPEC)
        if data is None:
            return None
        spec = SpecDocument.from_json(data)
        if not spec.running:
            return None
        secrets: dict[str, Any] = self._store.read(self._name, SECRETS) or {}
        previous = None
        if spec.previous is not None:
            previous = self._load(spec.previous, secrets.get("previous_env") or secrets.get("env"))
        current = self._load(spec.current, secrets.get("env"))
        return Desired(
            spec=spec,
            current=current,
            previous=previous,
            registry_auth=secrets.get("registry_auth"),
            auth_token=read_token(self._store, self._name) if current.config.auth else None,
        )

    def _load(self, record: DeploymentRecord, env: dict[str, str] | None) -> Deployment:
        key = (record.number, record.config_hash, tuple(sorted(record.group_counts.items())))
        if key not in self._cache:
            self._cache[key] = Deployment.load(record, dict(env or {}))
        return self._cache[key]
