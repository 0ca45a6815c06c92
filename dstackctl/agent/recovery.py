"""Repairs of what a crash or an outage left (pure: the agent carries them out).

- a container `created` but never started (its agent died in between) is removed;
- a replica stopped while Docker was away (a Docker restart) is started again;
- a replica that exited, or that hangs (a probe failed HUNG_FAILURES times in a row, twice
  what takes it out of rotation), is replaced when the service's `retry` covers `error`,
  within `retry.duration` of its first failure, and no rollout is under way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from dstackctl.agent.phases import EXITED_STATES, LIVE_STATES, ReplicaKey, ReplicaState
from dstackctl.probes import FAILURES_TO_LEAVE

HUNG_FAILURES = 2 * FAILURES_TO_LEAVE


class Repair(str, Enum):
    REMOVE = "remove"
    START = "start"
    REPLACE = "replace"


@dataclass(frozen=True)
class Action:
    repair: Repair
    container_id: str
    replica: ReplicaState
    reason: str


@dataclass(frozen=True)
class RetryPolicy:
    """The part of dstack's `retry` that applies on one machine: replace replicas on `error`."""

    on_error: bool
    duration: float | None  # seconds since the replica's first failure; None: forever


def hung(replica: ReplicaState) -> bool:
    container = replica.container
    return bool(
        container is not None
        and container.docker_status in LIVE_STATES
        and not replica.in_rotation
        and replica.failure_streak() >= HUNG_FAILURES
    )


def failure_reason(replica: ReplicaState) -> str:
    container = replica.container
    assert container is not None
    if container.docker_status in LIVE_STATES:
        return "stopped answering its probes"
    if container.oom_killed:
        return "ran out of memory"
    return f"exited with code {container.exit_code}"


def plan_repairs(
    replicas: list[ReplicaState],
    owned: Callable[[ReplicaState], bool],
    retry: RetryPolicy | None,
    rolling: bool,
    stopped_by_outage: set[str],
    failing_for: dict[ReplicaKey, float],
) -> list[Action]:
    """What to repair now. `owned`: the replica belongs to the target deployment;
    `failing_for`: how long each replica has been failing."""
    actions = []
    for replica in replicas:
        container = replica.container
        if container is None:
            continue
        status = container.docker_status
        if status == "created":
            actions.append(Action(Repair.REMOVE, container.id, replica, "created but never started"))
        elif status in EXITED_STATES and container.id in stopped_by_outage:
            actions.append(Action(Repair.START, container.id, replica, "it stopped while Docker was away"))
        elif (
            (status in EXITED_STATES or hung(replica))
            and retry is not None
            and retry.on_error
            and not rolling
            and owned(replica)
        ):
            seconds = failing_for.get(replica.key, 0.0)
            if retry.duration is None or seconds <= retry.duration:
                actions.append(Action(Repair.REPLACE, container.id, replica, failure_reason(replica)))
    return actions


# A replica seen running this shortly before Docker went away is started again when it is back.
OUTAGE_LOOKBACK_SECONDS = 30.0


class OutageMemory:
    """Which containers were running shortly before Docker went away: Docker may have stopped
    them on its way down before the agent noticed that it was going."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self.stopped: set[str] = set()

    def saw(self, running: Iterable[str]) -> None:
        now = time.monotonic()
        recent = {key: seen for key, seen in self._seen.items() if now - seen < OUTAGE_LOOKBACK_SECONDS}
        self._seen = {**recent, **dict.fromkeys(running, now)}

    def began(self) -> None:
        recent = time.monotonic() - OUTAGE_LOOKBACK_SECONDS
        self.stopped = {key for key, seen in self._seen.items() if seen >= recent}
