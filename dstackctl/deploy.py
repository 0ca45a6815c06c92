"""Submitting services: record the desired spec (the CLI is its only writer) and make sure
the service's agent runs. Rollouts are requested here and carried out by the agent."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstackctl.agent.process import start_agent
from dstackctl.config.loader import LoadedConfig
from dstackctl.endpoint_port import check_port_free, endpoint_port
from dstackctl.errors import DstackctlError, NoSuchService, UsageError
from dstackctl.replica_spec import PROBE_VALUE_PREFIX, config_hash
from dstackctl.service_token import keep_token
from dstackctl.spec_document import DEFAULT_ROLLOUT_TIMEOUT, DeploymentRecord, RolloutRequest, SpecDocument
from dstackctl.status import ObservedState
from dstackctl.store import SECRETS, SPEC, STATE, Store
from dstackctl.timeutil import utc_now

if TYPE_CHECKING:
    from dstackctl.docker import DockerEngine

_NAME_CHARS = re.compile(r"[^a-z0-9-]+")


def run_name(loaded: LoadedConfig, override: str | None) -> str:
    """`-n`, else the config's `name`, else derived from the file name (`demo.dstack.yml` -> demo)."""
    if override:
        from dstackctl.config.fields import check_run_name

        try:
            return check_run_name(override)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if loaded.config.name:
        return loaded.config.name
    stem = Path(loaded.file).name.split(".")[0].lower()
    candidate = _NAME_CHARS.sub("-", stem).strip("-")[:41]
    if not candidate or not candidate[0].isalpha():
        candidate = f"svc-{candidate}".strip("-")
    return candidate if len(candidate) >= 2 else "service"


def parse_env_overrides(pairs: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """`-e KEY=VAL` sets a value; `-e KEY` takes it from the caller's environment."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\Z", key):
            raise UsageError(f"-e {key!r}: expected KEY=VALUE or KEY with a valid variable name")
        if not sep:
            if key not in environ:
                raise UsageError(f"-e {key}: {key} is not set in your environment; use -e {key}=VALUE")
            value = environ[key]
        result[key] = value
    return result


def stored_config(loaded: LoadedConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """The config as the store keeps it: env reduced to names, registry credentials removed,
    literal probe header values replaced by references; and those values (hide_probe_values)."""
    data = loaded.config.model_dump(mode="json", exclude_unset=True)
    data["env"] = list(loaded.config.environment)
    data.pop("registry_auth", None)
    return data, hide_probe_values(data)


def hide_probe_values(data: dict[str, Any]) -> dict[str, str]:
    """Replace each literal probe header value (an API key, say) in a stored config by
    `${{ env.DSTACKCTL_PROBE_<probe>_HEADER_<header> }}`, and return those values: they are
    kept with the env values in secrets.json, never in spec.json or a container label."""
    hidden: dict[str, str] = {}
    for p, probe in enumerate(data.get("probes") or []):
        for h, header in enumerate(probe.get("headers") or [] if isinstance(probe, dict) else []):
            value = header.get("value") if isinstance(header, dict) else None
            if isinstance(value, str) and value and "${{" not in value:
                name = f"{PROBE_VALUE_PREFIX}{p}_HEADER_{h}"
                hidden[name] = value
                header["value"] = f"${{{{ env.{name} }}}}"
    return hidden


def wants_gpus(loaded: LoadedConfig) -> bool:
    """Whether any replica group asks for GPUs."""
    config = loaded.config
    return any(
        spec is not None and spec.wants_gpus
        for spec in (config.for_group(name).resources.gpu for name in config.group_counts)
    )


def gpu_plan(loaded: LoadedConfig, engine: DockerEngine | None) -> list[tuple[str, int, list[Any]]] | None:
    """Which GPUs each replica would get now, as (group, replica, GPUs); None when no group
    asks for GPUs. Groups are served in order, none sharing a GPU.

    Raises GpuError (exit 1) with what is missing, e.g. "needs 2 x 24GB..48GB for 2 replicas;
    found 1 x NVIDIA A10G 24GB".
    """
    from dstackctl.gpus import assign, discover

    if not wants_gpus(loaded):
        return None
    config = loaded.config
    wanting = [
        (name, count, config.for_group(name).resources.gpu) for name, count in config.group_counts.items()
    ]
    gpus = discover()
    taken = engine.gpus_in_use() if engine is not None else set()
    result: list[tuple[str, int, list[Any]]] = []
    for name, count, spec in wanting:
        if spec is None or not spec.wants_gpus:
            continue
        for num, chosen in enumerate(assign(spec, gpus, count, taken)):
            taken.update(g.uuid for g in chosen)
            result.append((name, num, chosen))
    return result


@dataclass
class Submitted:
    name: str
    outcome: str  # "started", "unchanged", "scaled" or "rollout"
    agent_restarted: bool = False
    deployment_num: int = 0


@dataclass
class Release:
    """A configuration ready to be recorded: what the store keeps and what the agent needs."""

    config: dict[str, Any]
    config_hash: str
    group_counts: dict[str, int]
    env: dict[str, str]
    probe_urls: list[str]

    @property
    def replicas(self) -> int:
        return sum(self.group_counts.values())

    @classmethod
    def of(cls, loaded: LoadedConfig, env_values: dict[str, str]) -> Release:
        full = loaded.config.model_dump(mode="json", exclude_unset=True)
        # A change of replica counts alone scales in place.
        full.pop("replicas", None)
        for group in full.get("groups") or []:
            group.pop("replicas", None)
            group.pop("count", None)
        config, probe_values = stored_config(loaded)
        return cls(
            config=config,
            config_hash=config_hash(full, env_values),
            group_counts=loaded.config.group_counts,
            env={**env_values, **probe_values},
            probe_urls=[probe.url for probe in loaded.config.effective_probes()],
        )

    def record(self, number: int, restart: bool = False) -> DeploymentRecord:
        return DeploymentRecord(
            number,
            self.config_hash,
            self.replicas,
            self.config,
            tuple(self.probe_urls),
            group_replicas=self.group_counts,
            restart=restart,
        )


@dataclass(frozen=True)
class Serving:
    """The deployment a service runs as its agent reports it: the spec's, or the previous one
    after a rollback; with the env values it runs with."""

    record: DeploymentRecord
    env: dict[str, str]
    is_previous: bool


def serving(store: Store, name: str, spec: SpecDocument) -> Serving:
    secrets = store.read(name, SECRETS) or {}
    observed = ObservedState.from_json(store.read(name, STATE) or {})
    rollout = observed.rollout
    rolled_back = (
        observed.run_id == spec.run_id
        and rollout is not None
        and rollout.to_deployment == spec.current.number
        and rollout.serving_deployment != spec.current.number
    )
    if rolled_back and spec.previous is not None:
        return Serving(spec.previous, dict(secrets.get("previous_env") or secrets.get("env") or {}), True)
    return Serving(spec.current, dict(secrets.get("env") or {}), False)


def rollout_under_way(store: Store, name: str, spec: SpecDocument) -> bool:
    """The spec asks for a rollout the agent has not finished (or not yet seen)."""
    request = spec.rollout
    if request is None or request.to_deployment != spec.current.number:
        return False
    observed = ObservedState.from_json(store.read(name, STATE) or {})
    status = observed.rollout
    seen = (
        observed.run_id == spec.run_id
        and status is not None
        and status.to_deployment == request.to_deployment
    )
    return not seen or bool(status and status.active)


def submit(
    store: Store,
    loaded: LoadedConfig,
    name: str,
    env_values: dict[str, str],
    port_override: int | None = None,
    rollout_timeout: int = DEFAULT_ROLLOUT_TIMEOUT,
) -> Submitted:
    """Record the desired spec and make sure the service's agent runs.

    A running service with the same config is left alone; with only `replicas` changed it
    scales in place; with any other change it gets a rolling update (as `redeploy -f`).
    """
    release = Release.of(loaded, env_values)
    with store.lock(name):
        data = store.read(name, SPEC)
    spec = SpecDocument.from_json(data) if data is not None else None
    if spec is None or not spec.running:
        return _start(store, loaded, name, release, port_override, rollout_timeout)
    now = serving(store, name, spec)
    if now.record.config_hash != release.config_hash:
        number = start_rollout(store, name, release, rollout_timeout)
        return Submitted(name, "rollout", deployment_num=number)
    keep_token(store, name, release.config)
    outcome = "unchanged"
    if now.record.group_counts != release.group_counts:
        scale(store, name, release.group_counts)
        outcome = "scaled"
    restarted = ensure_agent(store, name)
    return Submitted(name, outcome, agent_restarted=restarted, deployment_num=now.record.number)


def scale(store: Store, name: str, group_counts: dict[str, int]) -> None:
    """Change the replica counts of the deployment that serves, in place (no rollout)."""

    def scaled(record: DeploymentRecord) -> DeploymentRecord:
        return replace(record, replicas=sum(group_counts.values()), group_replicas=dict(group_counts))

    def change(data: dict[str, Any]) -> dict[str, Any]:
        spec = SpecDocument.from_json(data)
        now = serving(store, name, spec)
        if now.is_previous and spec.previous is not None:
            return replace(spec, previous=scaled(spec.previous)).to_json()
        return replace(spec, current=scaled(spec.current)).to_json()

    store.update(name, SPEC, change)


def _start(
    store: Store,
    loaded: LoadedConfig,
    name: str,
    release: Release,
    port_override: int | None,
    wake_timeout: int = DEFAULT_ROLLOUT_TIMEOUT,
) -> Submitted:
    port = endpoint_port(loaded, port_override)
    try:
        check_port_free(store, name, port)
    except DstackctlError:
        store.discard_if_unused(name)
        raise
    registry_auth = None
    config = loaded.config
    if config.registry_auth:
        registry_auth = {
            "username": _expand_secret(config.registry_auth.username, release.env),
            "password": _expand_secret(config.registry_auth.password, release.env),
        }
    spec = SpecDocument(
        name=name,
        run_id=uuid.uuid4().hex[:12],
        current=release.record(0),
        config_file=str(Path(loaded.file).absolute()),
        config_dir=str(Path(loaded.file).absolute().parent),
        submitted_at=utc_now(),
        endpoint_port=port,
        wake_timeout=wake_timeout,  # the --timeout of `run`: a request at zero replicas waits this
    )
    keep_token(store, name, release.config)
    with store.lock(name):
        store.write(name, SECRETS, {"env": release.env, "registry_auth": registry_auth})
        store.write(name, SPEC, spec.to_json())
    start_agent(store, name)
    return Submitted(name, "started")


def ensure_agent(store: Store, name: str) -> bool:
    """Start the service's agent when it is not running; True when it had to."""
    if store.agent_alive(name):
        return False
    start_agent(store, name)
    return True


def current_release(store: Store, name: str, overrides: Mapping[str, str] | None = None) -> Release:
    """The configuration that serves now, for `redeploy` without `-f` (restart every replica);
    with `overrides` (`redeploy -e`), its env values changed."""
    spec = SpecDocument.from_json(store.read(name, SPEC) or {})
    now = serving(store, name, spec)
    record = now.record
    env, digest = now.env, record.config_hash
    if overrides:
        env = {**now.env, **overrides}
        digest = config_hash({"config": record.config_hash}, env) if env != now.env else digest
    return Release(record.config, digest, record.group_counts, env, list(record.probe_urls))


def start_rollout(store: Store, name: str, release: Release, timeout: int) -> int:
    """Ask for a rollout from the deployment that serves to `release`; returns its number.

    The serving deployment is kept as `previous` so the agent can roll back to it.
    """
    keep_token(store, name, release.config)
    with store.lock(name):
        data = store.read(name, SPEC)
        spec = SpecDocument.from_json(data) if data is not None else None
        if spec is None or not spec.running:
            raise NoSuchService(name)
        if rollout_under_way(store, name, spec):
            _refuse_second_rollout(store, name, spec)
        secrets = store.read(name, SECRETS) or {}
        now = serving(store, name, spec)
        number = spec.current.number + 1
        store.write(name, SECRETS, {**secrets, "env": release.env, "previous_env": now.env})
        request = RolloutRequest(now.record.number, number, timeout, utc_now())
        # The same config again is a restart: every replica is replaced, as with `redeploy`.
        restart = release.config_hash == now.record.config_hash
        spec = replace(spec, current=release.record(number, restart), previous=now.record, rollout=request)
        store.write(name, SPEC, spec.to_json())
    ensure_agent(store, name)
    return number


def _refuse_second_rollout(store: Store, name: str, spec: SpecDocument) -> None:
    number = spec.current.number
    if ensure_agent(store, name):
        raise DstackctlError(
            f"{name} is being redeployed (deployment {number}) but its agent "
            f"was not running; restarted it, and it carries on with that rollout "
            f"(`dstackctl ps -v {name}`)"
        )
    observed = ObservedState.from_json(store.read(name, STATE) or {}).rollout
    state = observed.state if observed and observed.to_deployment == number else "in_progress"
    raise DstackctlError(
        f"{name} is already being redeployed (deployment {number}, {state.replace('_', ' ')}); "
        f"wait for it to finish (`dstackctl ps -v {name}`)"
    )


def forget_previous_env(store: Store, name: str) -> None:
    """After a finished rollout the previous deployment's env values are no longer needed."""

    def change(secrets: dict[str, Any]) -> None:
        secrets.pop("previous_env", None)

    store.update(name, SECRETS, change)


def _expand_secret(text: str, env_values: Mapping[str, str]) -> str:
    import os

    from dstackctl.config.fields import SECRET_NAMESPACES
    from dstackctl.config.interpolation import interpolate

    environ = {**os.environ, **env_values}
    try:
        return interpolate(text, {"secrets": environ, "env": environ}, SECRET_NAMESPACES)
    except KeyError as exc:
        raise UsageError(f"registry_auth uses {exc.args[0]}, which is not set in your environment") from None
