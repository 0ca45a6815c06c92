"""Read-only views of services for `ps` and waiting, built from the store alone.

Kept free of pydantic and docker-py imports: `ps` must start fast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from dstackctl.spec_document import SpecDocument, stored_groups
from dstackctl.status import GroupScaling, ObservedState, ReplicaRow, RolloutStatus
from dstackctl.store import SPEC, STATE, Store, StoreError
from dstackctl.timeutil import parse_utc

# The agent rewrites its state every 2 s (publishing.HEARTBEAT_SECONDS): older means it stopped.
STALE_STATE_SECONDS = 10.0


@dataclass
class RunView:
    name: str
    status: str
    deployment_num: int
    submitted_at: str | None
    url: str | None
    replicas: list[ReplicaRow]
    desired: str
    agent_alive: bool
    spec: SpecDocument
    observed: ObservedState
    engine_problem: str | None = None
    endpoint_error: str | None = None
    rollout: RolloutStatus | None = None
    warnings: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.desired == "running"

    @property
    def ready_replicas(self) -> int:
        return sum(1 for row in self.replicas if row.ready)

    @property
    def desired_replicas(self) -> int:
        target = self.observed.target_replicas
        return self.spec.current.replicas if target is None else target

    @property
    def scaling(self) -> dict[str, GroupScaling]:
        """The autoscaled groups, as the agent decided them (empty: no group scales)."""
        return self.observed.scaling if self.observed.run_id == self.spec.run_id else {}

    @property
    def replica_range(self) -> str | None:
        """`1..4`: the replicas an autoscaled service may have (fixed groups count as they are)."""
        scaling = self.scaling
        if not scaling:
            return None
        fixed = sum(n for g, n in self.spec.current.group_counts.items() if g not in scaling)
        low, high = (
            fixed + sum(s.min for s in scaling.values()),
            fixed + sum(s.max for s in scaling.values()),
        )
        return f"{low}..{high}"

    @property
    def rps(self) -> float | None:
        """Requests per second through the endpoint, over the first autoscaled group's window."""
        return next((s.rps for s in self.scaling.values()), None)

    @property
    def state_age(self) -> float | None:
        """Seconds since the agent last wrote the state (it writes every 2 s); None: unknown."""
        heartbeat = self.observed.agent.get("heartbeat_at")
        if not isinstance(heartbeat, str):
            return None
        try:
            return (datetime.now(timezone.utc) - parse_utc(heartbeat)).total_seconds()
        except ValueError:
            return None

    @property
    def stale_for(self) -> float | None:
        """How old the state of a running service is when its agent has stopped writing it."""
        age = self.state_age
        if self.active and self.agent_alive and age is not None and age > STALE_STATE_SECONDS:
            return age
        return None

    @property
    def degraded(self) -> bool:
        """A replica failed or left rotation, and fewer than desired are ready."""
        hurt = any(row.phase in ("failed", "unready") for row in self.replicas)
        return hurt and self.ready_replicas < self.desired_replicas

    @property
    def group_order(self) -> list[str]:
        """Group names in the order the config gives them (dstack numbers groups by it)."""
        groups = stored_groups(self.spec.current.config)
        if groups is None:
            return ["0"]
        return [str(g.get("name", i)) for i, g in enumerate(groups)]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "deployment_num": self.deployment_num,
            "submitted_at": self.submitted_at,
            "url": self.url,
            "agent_alive": self.agent_alive,
            "rollout": self.rollout.to_json() if self.rollout else None,
            "ready_replicas": self.ready_replicas,
            "desired_replicas": self.desired_replicas,
            "replicas": [_replica_json(row) for row in self.replicas],
            "scaling": {group: scaling.to_json() for group, scaling in self.scaling.items()},
        }


_REPLICA_KEYS = (
    "group",
    "replica_num",
    "job_num",
    "deployment_num",
    "status",
    "container_id",
    "ready",
    "probes",
    "host_port",
    "url",
    "exit_code",
    "message",
    "log_tail",
    "gpus",
)


def _replica_json(row: ReplicaRow) -> dict[str, Any]:
    data = row.to_json()
    return {key: data[key] for key in _REPLICA_KEYS}


def view(store: Store, name: str, listing: bool = False) -> RunView | None:
    """The service as `ps` shows it. `listing` (ps without NAME): a stopped service's
    unreadable state is a warning on the view, not an error."""
    data = store.read(name, SPEC)
    if data is None:
        return None
    spec = SpecDocument.from_json(data)
    warnings: tuple[str, ...] = ()
    try:
        state = store.read(name, STATE)
    except StoreError as exc:
        if spec.running or not listing:
            raise
        # A stopped service needs none of it: say so and show it as terminated.
        state, warnings = None, (f"{exc.message.rstrip('.')}; {name} is stopped, so ps shows it without it",)
    observed = ObservedState.from_json(state or {"name": name})
    if observed.run_id != spec.run_id:
        observed = ObservedState(name=name, run_id=spec.run_id)  # an older run's observations
    alive = store.agent_alive(name)
    status = observed.status
    replicas = list(observed.replicas)
    if not spec.running:
        # Stopped on purpose: terminating while its agent winds down, then terminated.
        status = "terminating" if alive else "terminated"
        replicas = replicas if alive else [_terminated(row) for row in replicas]
        alive = False
    # The spec's deployment, or the one the agent serves instead once it has seen the spec
    # (the previous one after a rollback).
    seen = observed.observed_deployment == spec.current.number and observed.deployment_num is not None
    deployment = (
        observed.deployment_num if seen and observed.deployment_num is not None else spec.current.number
    )
    found = RunView(
        name=name,
        status=status,
        deployment_num=deployment,
        submitted_at=spec.submitted_at,
        url=observed.url,
        replicas=replicas,
        desired=spec.desired,
        agent_alive=alive,
        spec=spec,
        observed=observed,
        engine_problem=observed.engine_problem,
        endpoint_error=observed.endpoint_error,
        rollout=_rollout(spec, observed),
        warnings=warnings,
    )
    if status == "running" and found.degraded:
        found.status = "degraded"
    return found


def _rollout(spec: SpecDocument, observed: ObservedState) -> RolloutStatus | None:
    """The agent's account of the latest rollout; a requested one it has not yet picked up
    shows as in progress (its agent starts on it within a reconcile round)."""
    request = spec.rollout
    status = observed.rollout
    if request is None or (status is not None and status.to_deployment == request.to_deployment):
        return status
    if request.to_deployment != spec.current.number:
        return status
    return RolloutStatus(
        "in_progress", request.from_deployment, request.to_deployment, None, request.started_at
    )


def _terminated(row: ReplicaRow) -> ReplicaRow:
    return replace(row, status="failed" if row.status == "failed" else "terminated", ready=False)


def all_views(store: Store, include_stopped: bool, problems: list[str] | None = None) -> list[RunView]:
    """Every readable service; the sentence of each unreadable one goes to `problems`."""
    views = []
    for name in store.names():
        try:
            found = view(store, name, listing=True)
        except StoreError as exc:
            if problems is None:
                raise
            problems.append(exc.message)
            continue
        if found is not None and (include_stopped or found.active):
            views.append(found)
    return views


def running_names(store: Store) -> list[str]:
    """Services whose spec asks for them to run (their observed state is not read)."""
    names = []
    for name in store.names():
        data = store.read(name, SPEC)
        if data is not None and SpecDocument.from_json(data).running:
            names.append(name)
    return names
