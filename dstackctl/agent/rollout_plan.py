"""Deciding what to do with a service's containers: the plan; the agent executes it.

The target is one deployment (number + config hash) with N replicas. Containers of the
target deployment are *current*; any other container is *old*. Without old replicas that
serve traffic, missing replicas are created all at once (first start, scale up, recovery).
While old replicas serve, the rollout goes with a surge of one: start one current replica,
wait until it is ready, then drain and stop one old replica, and repeat. A current replica
that fails during a rollout makes the plan say so; the agent then rolls back by making the
previous deployment the target again, which this same plan carries out.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Observed:
    """One container as the planner needs it."""

    key: str
    replica_num: int
    deployment_num: int
    config_hash: str
    running: bool
    ready: bool
    failed: bool


@dataclass(frozen=True)
class Target:
    deployment_num: int
    config_hash: str
    replicas: int

    def owns(self, replica: Observed) -> bool:
        return (replica.deployment_num, replica.config_hash) == (self.deployment_num, self.config_hash)


@dataclass
class Plan:
    create: list[int] = field(default_factory=list)
    """Replica numbers to start at the target deployment."""
    drain: list[str] = field(default_factory=list)
    """Serving containers to take out of rotation, drain, then stop."""
    remove: list[str] = field(default_factory=list)
    """Containers that serve nothing: stop at once."""
    waiting_for: list[str] = field(default_factory=list)
    """Current replicas that are not ready yet (the agent holds a rollout's deadline to them)."""
    failed: list[int] = field(default_factory=list)
    """Replica numbers of the target that failed (exited, or could not be created)."""
    rolling: bool = False
    """Old replicas still serve: replacing them one at a time."""
    complete: bool = False
    """Every replica is at the target and ready, and nothing old is left."""


def _preference(replica: Observed) -> tuple[bool, bool, bool, str]:
    return (not replica.ready, not replica.running, replica.failed, replica.key)


def plan(target: Target, observed: list[Observed], create_failed: set[int]) -> Plan:
    result = Plan()
    kept: dict[int, Observed] = {}
    for replica in sorted((r for r in observed if target.owns(r)), key=_preference):
        if 0 <= replica.replica_num < target.replicas and replica.replica_num not in kept:
            kept[replica.replica_num] = replica
        elif replica.ready:
            result.drain.append(replica.key)  # scale down, or a duplicate that serves
        else:
            result.remove.append(replica.key)
    old_serving = [r for r in observed if not target.owns(r) and r.ready]
    result.remove += [r.key for r in observed if not target.owns(r) and not r.ready]
    missing = [num for num in range(target.replicas) if num not in kept and num not in create_failed]
    result.failed = sorted([num for num, r in kept.items() if r.failed] + list(create_failed))

    if not old_serving:
        result.create = missing
        # A rollout's deadline holds also when nothing old serves (it was not ready either).
        result.waiting_for = [r.key for r in kept.values() if not r.ready and not r.failed]
        result.complete = len(kept) == target.replicas and all(r.ready for r in kept.values())
        result.complete = result.complete and not result.remove and not result.drain
        return result

    result.rolling = True
    if result.failed:
        return result
    pending = [r.key for r in kept.values() if not r.ready]
    if pending:
        result.waiting_for = pending
        return result
    replaced = [r for r in old_serving if r.replica_num in kept or r.replica_num >= target.replicas]
    if replaced:
        result.drain.append(min(replaced, key=lambda r: (r.replica_num, r.key)).key)
    elif missing:
        result.create = [missing[0]]
    else:  # old replicas of numbers the target does not have: retire one
        result.drain.append(old_serving[0].key)
    return result
