"""What the agent is asked to run: spec.json and secrets.json, typed and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dstackctl.config.models import ServiceConfiguration
from dstackctl.config.probe_model import ProbeConfig
from dstackctl.config.probe_values import resolve_probes
from dstackctl.spec_document import DeploymentRecord, SpecDocument
from dstackctl.store import SECRETS, SPEC, Store


@dataclass(frozen=True)
class Deployment:
    """One configuration the service runs, with its env values and expanded probes."""

    number: int
    config_hash: str
    replicas: int
    config: ServiceConfiguration
    env: dict[str, str]
    probes: list[ProbeConfig]
    probe_urls: list[str]  # as written, `${{ env.X }}` unexpanded: what `ps` may show

    @classmethod
    def load(cls, record: DeploymentRecord, env: dict[str, str]) -> Deployment:
        config = ServiceConfiguration.model_validate(record.config)
        return cls(
            number=record.number,
            config_hash=record.config_hash,
            replicas=record.replicas,
            config=config,
            env=env,
            probes=resolve_probes(config, env),
            probe_urls=[probe.url for probe in config.effective_probes()],
        )

    def owns(self, deployment_num: int, config_hash: str) -> bool:
        return (deployment_num, config_hash) == (self.number, self.config_hash)


@dataclass(frozen=True)
class Desired:
    spec: SpecDocument
    current: Deployment
    previous: Deployment | None
    registry_auth: dict[str, str] | None

    @property
    def config_dir(self) -> Path:
        return Path(self.spec.config_dir or "/")

    def deployment(self, deployment_num: int, config_hash: str) -> Deployment | None:
        for deployment in (self.current, self.previous):
            if deployment is not None and deployment.owns(deployment_num, config_hash):
                return deployment
        return None


class DesiredReader:
    """Reads the desired documents on every round; validates each configuration only once."""

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self._name = name
        self._cache: dict[tuple[int, str, int], Deployment] = {}

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
        return Desired(
            spec=spec,
            current=self._load(spec.current, secrets.get("env")),
            previous=previous,
            registry_auth=secrets.get("registry_auth"),
        )

    def _load(self, record: DeploymentRecord, env: dict[str, str] | None) -> Deployment:
        key = (record.number, record.config_hash, record.replicas)
        if key not in self._cache:
            self._cache[key] = Deployment.load(record, dict(env or {}))
        return self._cache[key]
