"""Autoscaling on request rate: dstack's RPSAutoscaler, per replica group, owned by the agent.

The rules are dstack 0.22.5's (`server/services/services/autoscalers.py`, applied per group in
`server/background/pipeline_tasks/runs/common.py` `compute_desired_replica_counts`):
desired = ceil(rps / target) clipped to the group's range, where rps is the requests of the
window divided by the window; from zero replicas it scales up at once; otherwise no scale-up
sooner than `scale_up_delay` and no scale-down sooner than `scale_down_delay` after the last
scaling event of the service. As in dstack every group sees the service's rate: the endpoint
counts every request it receives (all of them reach the router group when there is one).

Where we differ, on purpose:
- a changed range applies at once (dstack holds a count outside the new range until the
  delay has passed);
- a restarted agent has no request history, so it scales down only after it has counted a
  whole window (dstack's gateway keeps its counts);
- decisions wait while a rollout is under way (except from zero: a request is waiting), so a
  rollout replaces the replicas the service had when it began; the count it would change to is
  shown as pending and applied when the rollout ends.

The decided counts are observed state: published in state.json (`scaling`) and read back by a
restarted agent; the user's spec is never rewritten.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from dstackctl.agent.desired import Deployment
from dstackctl.config.groups import DEFAULT_SCALING_WINDOW, ReplicaGroup
from dstackctl.config.units import format_duration
from dstackctl.request_rate import RequestRate
from dstackctl.status import GroupScaling
from dstackctl.timeutil import parse_utc, utc_at
from dstackctl.wording import decimal

log = logging.getLogger("dstackctl.agent")


@dataclass(frozen=True)
class ScalingRule:
    """A group's range and `scaling`, in numbers."""

    minimum: int
    maximum: int
    target: float
    window: int
    up_delay: int
    down_delay: int

    @classmethod
    def of(cls, group: ReplicaGroup) -> ScalingRule | None:
        scaling = group.scaling
        if scaling is None:
            return None
        size = group.size
        return cls(
            minimum=size.min or 0,
            maximum=size.max if size.max is not None else size.min or 0,
            target=scaling.target,
            window=scaling.window or DEFAULT_SCALING_WINDOW,
            up_delay=scaling.scale_up_delay,
            down_delay=scaling.scale_down_delay,
        )

    def clip(self, count: int) -> int:
        return min(max(count, self.minimum), self.maximum)


@dataclass(frozen=True)
class Decision:
    count: int
    reason: str = ""  # why the count changed; empty when it did not
    pending: str = ""  # a change the delays (or a rollout) hold back, in words


def decide(
    rule: ScalingRule,
    current: int,
    requests: int,
    since_scaled: float | None,
    history: float = math.inf,
    holding: bool = False,
) -> Decision:
    """The count for a group now at `current` replicas that received `requests` in the
    window. `since_scaled`: seconds since the service's last scaling event (None: never);
    `history`: seconds of request counts there are; `holding`: a rollout is under way."""
    if rule.clip(current) != current:
        return Decision(rule.clip(current), f"the range is now {rule.minimum}..{rule.maximum}")
    rps = requests / rule.window
    wanted = rule.clip(math.ceil(rps / rule.target))
    rate = f"{decimal(rps)} rps over {format_duration(rule.window)} for a target of {decimal(rule.target)}"
    if wanted == current:
        return Decision(current)
    if wanted > current and current == 0:
        return Decision(wanted, f"{rate}: from zero at once")
    if holding:
        return Decision(current, pending=f"{wanted} after the rollout")
    delay, verb = (rule.up_delay, "scale-up") if wanted > current else (rule.down_delay, "scale-down")
    if since_scaled is not None and since_scaled < delay:
        left = format_duration(math.ceil(delay - since_scaled))
        return Decision(current, pending=f"{verb} to {wanted} in {left} ({verb.replace('-', '_')}_delay)")
    if wanted < current and history < rule.window:
        left = format_duration(math.ceil(rule.window - history))
        return Decision(current, pending=f"scale-down to {wanted} in {left} (counting a whole window)")
    return Decision(wanted, rate)


class Autoscaler:
    """Keeps each autoscaled group's count and the service's last scaling event."""

    def __init__(
        self,
        rate: RequestRate,
        restored: dict[str, GroupScaling] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._started = clock()
        restored = restored or {}
        self._counts = {group: scaling.desired for group, scaling in restored.items()}
        times = [_epoch(s.last_scaled_at) for s in restored.values() if s.last_scaled_at]
        self._last_scaled = max((t for t in times if t is not None), default=None)
        self.groups: dict[str, GroupScaling] = dict(restored)

    @property
    def can_idle(self) -> bool:
        """Some group may be at zero replicas: requests then wait for one to start."""
        return any(scaling.min == 0 for scaling in self.groups.values())

    def apply(self, deployment: Deployment, holding: bool = False) -> Deployment:
        """The deployment with each autoscaled group's count decided now."""
        now = self._clock()
        if self._last_scaled is None:
            self._last_scaled = now  # the service's start is its first scaling event (as dstack)
        since_scaled = now - self._last_scaled  # one event for the round, as dstack computes it
        counts: dict[str, int] = {}
        published: dict[str, GroupScaling] = {}
        for group in deployment.config.replica_groups:
            rule = ScalingRule.of(group)
            name = str(group.name)
            if rule is None:
                continue
            current = self._counts.get(name, deployment.groups[name].count)
            requests = self.rate.requests_in(rule.window)
            decision = decide(rule, current, requests, since_scaled, now - self._started, holding)
            if decision.count != current:
                log.info("group %s: scaling %d -> %d: %s", name, current, decision.count, decision.reason)
                self._last_scaled = now
            counts[name] = self._counts[name] = decision.count
            published[name] = GroupScaling(
                min=rule.minimum,
                max=rule.maximum,
                desired=decision.count,
                target=rule.target,
                window=rule.window,
                rps=round(requests / rule.window, 2),
                last_scaled_at=utc_at(self._last_scaled),
                pending=decision.pending or None,
            )
        self.groups = published
        if not counts:
            return deployment
        groups = {
            name: replace(target, count=counts[name]) if name in counts else target
            for name, target in deployment.groups.items()
        }
        return replace(deployment, groups=groups)


def _epoch(text: str) -> float | None:
    try:
        return parse_utc(text).timestamp()
    except ValueError:
        return None
