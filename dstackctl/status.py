"""Observed state as the agent publishes it in state.json: one typed structure that the agent
writes and that `ps`, `--json` and the waiting code read.

Kept free of pydantic and docker-py: `ps` must start fast.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, TypeVar

from dstackctl.labels import replica_name

# Rollout states still under way (the others: done, rolled_back, rollback_failed).
ROLLOUT_ACTIVE = ("in_progress", "rolling_back")


T = TypeVar("T")


class _Shape:
    """What the readers need of a dataclass, worked out once. (Not a dataclass itself: each
    one costs `ps` most of a millisecond to create at import.)"""

    __slots__ = ("defaults", "names", "required", "simple")

    def __init__(self, names: frozenset[str], defaults: dict[str, Any], simple: bool) -> None:
        self.names = names
        self.defaults = defaults
        self.required = names - defaults.keys()  # the fields without a default
        self.simple = simple  # no default_factory: its defaults can be copied


_SHAPES: dict[type, _Shape] = {}


def _shape(cls: type) -> _Shape:
    shape = _SHAPES.get(cls)
    if shape is None:
        found = fields(cls)
        defaults = {f.name: f.default for f in found if f.default is not MISSING}
        names = frozenset(f.name for f in found)
        simple = all(f.default_factory is MISSING for f in found)
        shape = _SHAPES[cls] = _Shape(names, defaults, simple)
    return shape


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of `data` that are fields of the dataclass `cls` (older files lack some)."""
    names = _shape(cls).names
    return {key: value for key, value in data.items() if key in names}


def _restored(cls: type[T], values: dict[str, Any]) -> T:
    """An instance of the frozen dataclass `cls` from a file's values (`_known` ones) without
    its __init__: its one object.__setattr__ per field made reading the rows of 1000 services
    take twice as long. Without a required value it goes through __init__, which names it."""
    shape = _shape(cls)
    if not shape.simple or not shape.required <= values.keys():
        return cls(**values)
    instance = object.__new__(cls)
    attributes = instance.__dict__
    attributes.update(shape.defaults)
    attributes.update(values)
    return instance


@dataclass(frozen=True)
class ProbeView:
    """One probe of one replica: its streaks and last result (never header values)."""

    url: str
    ready_after: int
    success_streak: int = 0
    failure_streak: int = 0
    last_checked_at: str | None = None
    last_error: str | None = None
    last_status: int | None = None

    @property
    def ready(self) -> bool:
        return self.success_streak >= self.ready_after

    @property
    def symbol(self) -> str:
        if self.ready:
            return "✓"
        return "~" if self.success_streak > 0 else "×"

    def describe(self, label: str = "") -> str:
        """`/health 1/2 ok`, `/health 0/2 (HTTP 503)` or `/health 0/1 (not probed yet)`."""
        text = f"{label}{self.url} {self.success_streak}/{self.ready_after}"
        if self.last_error:
            return f"{text} ({self.last_error})"
        return f"{text} ok" if self.last_checked_at else f"{text} (not probed yet)"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "symbol": self.symbol}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeView:
        return _restored(cls, _known(cls, data))


@dataclass(frozen=True)
class ReplicaRow:
    """One replica (a container, or a slot of the target not created yet) as published."""

    replica_num: int
    deployment_num: int
    group: str = "0"
    job_num: int = 0
    config_hash: str = ""
    status: str = "provisioning"  # dstack's: provisioning, running, terminating, terminated, failed
    phase: str = "provisioning"  # ours, finer: see agent/phases.py
    ready: bool = False  # in the endpoint's rotation now
    container_id: str | None = None
    container_name: str | None = None
    host_port: int | None = None
    url: str | None = None
    exit_code: int | None = None
    message: str | None = None
    log_tail: tuple[str, ...] = ()
    probes: tuple[ProbeView, ...] = ()
    submitted_at: str | None = None
    gpus: tuple[dict[str, Any], ...] = ()
    restarts: int = 0

    @property
    def running_and_ready(self) -> bool:
        return self.status == "running" and self.ready

    def describe_probes(self, label: str = "") -> str:
        return ", ".join(probe.describe(label) for probe in self.probes)

    @property
    def name(self) -> str:
        """`replica=0`, or `group=workers replica=0` in a service with groups."""
        return replica_name(self.group, self.replica_num)

    def describe(self) -> str:
        """`replica=0 running: /health 0/1 (HTTP 503)`, `replica=1 failed: exited with code 3`."""
        text = f"{self.name} {self.status}"
        if self.message:
            return f"{text}: {self.message}"
        probes = self.describe_probes() if self.status == "running" else ""
        return f"{text}: {probes}" if probes else text

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(
            log_tail=list(self.log_tail),
            probes=[probe.to_json() for probe in self.probes],
            gpus=list(self.gpus),
        )
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplicaRow:
        known = _known(cls, data)
        known.update(
            log_tail=tuple(data.get("log_tail") or ()),
            probes=tuple(ProbeView.from_json(p) for p in data.get("probes") or ()),
            gpus=tuple(data.get("gpus") or ()),
        )
        return _restored(cls, known)


@dataclass(frozen=True)
class RolloutStatus:
    """How the agent is carrying out (or carried out) the rollout to `to_deployment`."""

    state: str  # in_progress, rolling_back, done, rolled_back, rollback_failed
    from_deployment: int
    to_deployment: int
    reason: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    # (group, replica) of the previous deployment's replicas in rotation when the rollout
    # began; None when not known (then a rollback must make every replica ready).
    serving_at_start: tuple[tuple[str, int], ...] | None = None

    @property
    def active(self) -> bool:
        return self.state in ROLLOUT_ACTIVE

    @property
    def serving_deployment(self) -> int:
        """The deployment the agent makes the service run."""
        return self.to_deployment if self.state in ("in_progress", "done") else self.from_deployment

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RolloutStatus | None:
        if not data or "state" not in data:
            return None
        known = _known(cls, data)
        serving = known.get("serving_at_start")
        if serving is not None:
            known["serving_at_start"] = tuple((str(group), int(num)) for group, num in serving)
        return cls(**known)


@dataclass(frozen=True)
class GroupScaling:
    """A group's autoscaling as the agent keeps it: its range and rule, the count it decided,
    the rate it measured and when it last scaled (the agent's own state: it survives a restart)."""

    min: int
    max: int
    desired: int
    target: float
    window: int
    rps: float = 0.0
    last_scaled_at: str | None = None  # of the service, as dstack counts scaling events
    pending: str | None = None  # a change the delays hold back, in words

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GroupScaling | None:
        try:
            return cls(**_known(cls, data))
        except TypeError:
            return None


@dataclass(frozen=True)
class ObservedState:
    """state.json: written by the service's agent alone."""

    name: str
    run_id: str | None
    status: str = "pending"
    observed_deployment: int | None = None  # the spec's deployment number the agent has acted on
    deployment_num: int | None = None  # the deployment it serves (the previous one after a rollback)
    target_replicas: int | None = None  # how many replicas of it the agent converges to
    replicas: tuple[ReplicaRow, ...] = ()
    rollout: RolloutStatus | None = None
    url: str | None = None
    engine_problem: str | None = None
    endpoint_error: str | None = None
    scaling: dict[str, GroupScaling] = field(default_factory=dict)  # autoscaled groups only
    agent: dict[str, Any] = field(default_factory=dict)
    updated_at: str | None = None

    def rows_of(self, deployment_num: int) -> list[ReplicaRow]:
        return [row for row in self.replicas if row.deployment_num == deployment_num]

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(
            replicas=[row.to_json() for row in self.replicas],
            rollout=self.rollout.to_json() if self.rollout else None,
            scaling={group: scaling.to_json() for group, scaling in self.scaling.items()},
        )
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObservedState:
        known = _known(cls, data)
        known.setdefault("name", "")
        known.setdefault("run_id", None)
        known.update(
            replicas=tuple(ReplicaRow.from_json(r) for r in data.get("replicas") or ()),
            rollout=RolloutStatus.from_json(data.get("rollout")),
            scaling=_scaling_of(data.get("scaling")),
            agent=dict(data.get("agent") or {}),
        )
        return cls(**known)


def _scaling_of(data: Any) -> dict[str, GroupScaling]:
    if not isinstance(data, dict):
        return {}
    found = {str(k): GroupScaling.from_json(v) for k, v in data.items() if isinstance(v, dict)}
    return {group: scaling for group, scaling in found.items() if scaling is not None}


def run_status(rows: list[ReplicaRow]) -> str:
    statuses = {row.status for row in rows}
    if not rows:
        return "running"
    if statuses == {"failed"}:
        return "failed"
    if "provisioning" in statuses:
        return "provisioning"
    return "running"
