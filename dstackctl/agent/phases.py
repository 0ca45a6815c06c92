"""Each replica's phase, and the one class that moves replicas between phases.

    provisioning -> starting -> ready <-> unready
         |             |          |         |
         +-> failed <--+----------+---------+      any live phase -> draining -> (removed)

- provisioning: a slot of the target deployment with no container yet (pulling, creating);
- starting: the container runs and has not yet been ready;
- ready: in the endpoint's rotation; unready: it was, and its probes took it out;
- draining: out of rotation, in-flight requests finish, then it is stopped;
- failed: it exited (or could not be created) before it was stopped on purpose.

`ReplicaBook` owns these transitions. The endpoint's rotation and the status publisher are
its consumers: each change is pushed to them, and nothing else decides readiness.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

from dstackctl.status import ProbeView

if TYPE_CHECKING:
    from dstackctl.replica import Replica

LIVE_STATES = ("running", "paused")
EXITED_STATES = ("exited", "dead")


class Phase(str, Enum):
    PROVISIONING = "provisioning"
    STARTING = "starting"
    READY = "ready"
    UNREADY = "unready"
    DRAINING = "draining"
    FAILED = "failed"

    @property
    def status(self) -> str:
        """dstack's replica status for this phase."""
        return _STATUS[self]


_STATUS = {
    Phase.PROVISIONING: "provisioning",
    Phase.STARTING: "running",
    Phase.READY: "running",
    Phase.UNREADY: "running",
    Phase.DRAINING: "terminating",
    Phase.FAILED: "failed",
}


@dataclass(frozen=True, order=True)
class ReplicaKey:
    """A replica as dstack names it: group, replica number, deployment number."""

    group: str
    replica_num: int
    deployment_num: int


@dataclass(frozen=True)
class Container:
    """What Docker said about a replica's container at the last observation."""

    id: str
    name: str
    docker_status: str
    config_hash: str
    group_hash: str = ""
    host_port: int | None = None
    started_at: str | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    gpu_uuids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplicaState:
    key: ReplicaKey
    phase: Phase
    container: Container | None = None
    in_rotation: bool = False  # what the probes say; `ready` also needs the phase
    probed: bool = False  # some probe (or the connect check) has reported at least once
    probes: tuple[ProbeView, ...] = ()
    message: str | None = None

    @property
    def id(self) -> str | None:
        return self.container.id if self.container else None

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    def failure_streak(self) -> int:
        return max((p.failure_streak for p in self.probes), default=0)


Consumer = Callable[[ReplicaState | None, ReplicaState | None], None]


class ReplicaBook:
    """The replicas of one service, keyed by container id (slots by their key), and their phases.

    Every transition happens here, under one lock, and is pushed to the consumers as
    (before, after); `after` is None when a replica left the book.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._containers: dict[str, ReplicaState] = {}
        self._slots: dict[ReplicaKey, ReplicaState] = {}
        self._wanted: set[ReplicaKey] = set()
        self._consumers: list[Consumer] = []
        self._routed_group: str | None = None

    def subscribe(self, consumer: Consumer) -> None:
        self._consumers.append(consumer)

    def route_to(self, group: str | None) -> bool:
        """Only this group's replicas take the endpoint's traffic (a router group); None: all.
        True when that changed."""
        with self._lock:
            changed = group != self._routed_group
            self._routed_group = group
            return changed

    # --- reading ----------------------------------------------------------------------

    def replicas(self) -> list[ReplicaState]:
        with self._lock:
            return sorted([*self._containers.values(), *self._slots.values()], key=_order)

    def get(self, container_id: str) -> ReplicaState | None:
        with self._lock:
            return self._containers.get(container_id)

    def in_rotation(self) -> dict[str, int]:
        """Container id -> host port of every ready replica: the endpoint's rotation."""
        with self._lock:
            return {
                s.container.id: s.container.host_port
                for s in self._containers.values()
                if s.ready
                and s.container
                and s.container.host_port
                and self._routed_group in (None, s.key.group)
            }

    def apply_rotation(self, apply: Callable[[dict[str, int]], None]) -> None:
        """Hand the rotation to `apply` under the lock, so it cannot cross a newer one."""
        with self._lock:
            apply(self.in_rotation())

    # --- transitions ------------------------------------------------------------------

    def observe(self, key: ReplicaKey, container: Container) -> ReplicaState:
        """A container as Docker lists it now."""
        with self._lock:
            before = self._containers.get(container.id)
            self._slots.pop(key, None)
            if before is None:
                after = ReplicaState(key, _first_phase(container), container)
            else:
                after = replace(before, container=container, phase=_next_phase(before, container))
            if after.phase is Phase.FAILED:
                after = replace(after, in_rotation=False)
            self._set(before, after)
            return after

    def forget_missing(self, present: Iterable[str]) -> None:
        """Containers that Docker no longer lists are gone."""
        with self._lock:
            keep = set(present)
            for container_id in [c for c in self._containers if c not in keep]:
                self._remove(container_id)

    def probed(
        self, container_id: str, in_rotation: bool, probes: tuple[ProbeView, ...], checked: bool
    ) -> None:
        """The probe runner's verdict on a live replica; `checked`: some check has run."""
        with self._lock:
            before = self._containers.get(container_id)
            if before is None:
                return
            phase = before.phase
            if in_rotation and phase in (Phase.STARTING, Phase.UNREADY):
                phase = Phase.READY
            elif not in_rotation and phase is Phase.READY:
                phase = Phase.UNREADY
            probed = before.probed or checked
            self._set(
                before, replace(before, phase=phase, in_rotation=in_rotation, probed=probed, probes=probes)
            )

    def drain(self, container_id: str) -> None:
        with self._lock:
            before = self._containers.get(container_id)
            if before is not None and before.phase is not Phase.FAILED:
                message = "draining requests before it stops"
                self._set(before, replace(before, phase=Phase.DRAINING, message=message))

    def want(self, keys: Iterable[ReplicaKey]) -> None:
        """The replicas of the target: one that loses its container keeps a row, as a slot."""
        with self._lock:
            self._wanted = set(keys)

    def removed(self, container_id: str) -> None:
        with self._lock:
            self._remove(container_id)

    def slot(self, key: ReplicaKey, message: str, failed: bool = False) -> None:
        """A replica of the target without a container: being provisioned, or failed to be."""
        with self._lock:
            before = self._slots.get(key)
            phase = Phase.FAILED if failed else Phase.PROVISIONING
            after = ReplicaState(key, phase, message=message)
            if before != after:
                self._slots[key] = after
                self._push(before, after)

    def clear_slots(self, keep: Iterable[ReplicaKey] = ()) -> None:
        with self._lock:
            wanted = set(keep)
            for key in [k for k in self._slots if k not in wanted]:
                self._push(self._slots.pop(key), None)

    # --- internals --------------------------------------------------------------------

    def _set(self, before: ReplicaState | None, after: ReplicaState) -> None:
        assert after.container is not None
        self._containers[after.container.id] = after
        if before != after:
            self._push(before, after)

    def _remove(self, container_id: str) -> None:
        before = self._containers.pop(container_id, None)
        if before is None:
            return
        self._push(before, None)
        key = before.key
        replaced = key in self._slots or any(s.key == key for s in self._containers.values())
        if key in self._wanted and not replaced:
            self._slots[key] = ReplicaState(key, Phase.PROVISIONING, message="waiting for the agent")
            self._push(None, self._slots[key])

    def _push(self, before: ReplicaState | None, after: ReplicaState | None) -> None:
        for consumer in self._consumers:
            consumer(before, after)


def _order(state: ReplicaState) -> tuple[ReplicaKey, str]:
    return state.key, state.id or ""


def _first_phase(container: Container) -> Phase:
    if container.docker_status in EXITED_STATES:
        return Phase.FAILED
    return Phase.STARTING if container.docker_status in LIVE_STATES else Phase.PROVISIONING


def _next_phase(before: ReplicaState, container: Container) -> Phase:
    status = container.docker_status
    if before.phase is Phase.DRAINING:
        return Phase.DRAINING  # it is being stopped on purpose: an exit is no failure
    if status in EXITED_STATES:
        return Phase.FAILED
    if status in LIVE_STATES:
        if before.phase in (Phase.FAILED, Phase.PROVISIONING):
            return Phase.STARTING  # started again (after a Docker restart)
        return before.phase
    return Phase.PROVISIONING  # created, restarting


def key_of(replica: Replica) -> ReplicaKey:
    return ReplicaKey(replica.group, replica.replica_num, replica.deployment_num)


def container_of(replica: Replica) -> Container:
    return Container(
        id=replica.id,
        name=replica.name,
        docker_status=replica.status,
        config_hash=replica.config_hash,
        group_hash=replica.group_hash,
        host_port=replica.host_port,
        started_at=replica.started_at,
        exit_code=replica.exit_code,
        oom_killed=replica.oom_killed,
        gpu_uuids=tuple(replica.gpu_uuids),
    )
