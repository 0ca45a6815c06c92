"""Deciding what to do with a service's containers: the plan; the agent executes it.

The target is one deployment with its replica slots: (group, replica number) pairs. Containers
the target owns are *current* (started for it, or of a group it did not change); any other
container is *old*. Without old replicas that
serve traffic, missing replicas are created all at once (first start, scale up, recovery).
While old replicas serve, the rollout goes with a surge of one: start one current replica,
wait until it is ready, then drain and stop one old replica, and repeat. A current replica
that fails during a rollout makes the plan say so; the agent then rolls back by making the
previous deployment the target again, which this same plan carries out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dstackctl.labels import replica_name

Slot = tuple[str, int]
"""A replica's place: (group, replica number)."""


def slot_name(slot: Slot) -> str:
    return replica_name(*slot)


@dataclass(frozen=True)
class Observed:
    """One container as the planner needs it."""

    key: str
    slot: Slot
    owned: bool  # the target owns it (see Deployment.owns)
    running: bool
    ready: bool
    failed: bool


@dataclass(frozen=True)
class Target:
    slots: tuple[Slot, ...]


@dataclass
class Plan:
    create: list[Slot] = field(default_factory=list)
    """Slots to start a replica of the target deployment in."""
    drain: list[str] = field(default_factory=list)
    """Serving containers to take out of rotation, drain, then stop."""
    remove: list[str] = field(default_factory=list)
    """Containers that serve nothing: stop at once."""
    waiting_for: list[str] = field(default_factory=list)
    """Current replicas that are not ready yet (the agent holds a rollout's deadline to them)."""
    failed: list[Slot] = field(default_factory=list)
    """Slots of the target whose replica failed (exited, or could not be created)."""
    rolling: bool = False
    """Old replicas still serve: replacing them one at a time."""
    complete: bool = False
    """Every replica is at the target and ready, and nothing old is left."""
    in_place: bool = False
    """Every slot has a replica of the target, ready or not (exited too), and nothing old is left."""
    unready: list[Slot] = field(default_factory=list)
    """Slots of the target whose replica is there but not ready (not yet, or exited)."""
    serving_old: list[Slot] = field(default_factory=list)
    """Slots of old replicas that serve (a rollout notes them when it begins)."""


def _preference(replica: Observed) -> tuple[bool, bool, bool, str]:
    return (not replica.ready, not replica.running, replica.failed, replica.key)


def plan(target: Target, observed: list[Observed], create_failed: set[Slot]) -> Plan:
    result = Plan()
    wanted = set(target.slots)
    kept: dict[Slot, Observed] = {}
    for replica in sorted((r for r in observed if r.owned), key=_preference):
        if replica.slot in wanted and replica.slot not in kept:
            kept[replica.slot] = replica
        elif replica.ready:
            result.drain.append(replica.key)  # scale down, or a duplicate that serves
        else:
            result.remove.append(replica.key)
    old_serving = [r for r in observed if not r.owned and r.ready]
    result.remove += [r.key for r in observed if not r.owned and not r.ready]
    missing = [slot for slot in target.slots if slot not in kept and slot not in create_failed]
    result.failed = sorted([slot for slot, r in kept.items() if r.failed] + list(create_failed))
    result.unready = sorted(slot for slot, r in kept.items() if not r.ready)
    result.serving_old = sorted(r.slot for r in old_serving)

    if not old_serving:
        result.create = missing
        # A rollout's deadline holds also when nothing old serves (it was not ready either).
        result.waiting_for = [r.key for r in kept.values() if not r.ready and not r.failed]
        result.in_place = len(kept) == len(wanted) and not result.remove and not result.drain
        result.complete = result.in_place and not result.unready
        return result

    result.rolling = True
    if result.failed:
        return result
    pending = [r.key for r in kept.values() if not r.ready]
    if pending:
        result.waiting_for = pending
        return result
    replaced = [r for r in old_serving if r.slot in kept or r.slot not in wanted]
    if replaced:
        result.drain.append(min(replaced, key=_slot_order(target)).key)
    elif missing:
        result.create = [missing[0]]
    else:  # old replicas of numbers the target does not have: retire one
        result.drain.append(old_serving[0].key)
    return result


def _slot_order(target: Target) -> Callable[[Observed], tuple[int, str]]:
    """Old replicas are replaced in the target's slot order (groups as written, then numbers);
    those of slots it no longer has go last."""
    order = {slot: index for index, slot in enumerate(target.slots)}
    return lambda r: (order.get(r.slot, len(order)), r.key)
