"""Autoscaling on request rate: dstack's rules as a table, the request counter, the agent's Autoscaler."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, NamedTuple

import pytest

from dstackctl.agent.autoscaler import Autoscaler, ScalingRule, decide
from dstackctl.agent.desired import Deployment
from dstackctl.config.loader import parse_service
from dstackctl.deploy import Release
from dstackctl.request_rate import HISTORY_SECONDS, RequestRate
from dstackctl.status import GroupScaling

RULE = ScalingRule(minimum=0, maximum=4, target=1, window=60, up_delay=10, down_delay=20)


def dstack_count(rule: ScalingRule, current: int, requests: int, since_scaled: float | None) -> int:
    """RPSAutoscaler.get_desired_count of dstack 0.22.5, transcribed (stats given)."""
    rps = requests / rule.window
    new = min(max(math.ceil(rps / rule.target), rule.minimum), rule.maximum)
    if new > current:
        if current == 0:
            return new
        if since_scaled is not None and since_scaled < rule.up_delay:
            return current
        return new
    if new < current:
        if since_scaled is not None and since_scaled < rule.down_delay:
            return current
        return new
    return new


class Case(NamedTuple):
    current: int
    requests: int
    since_scaled: float | None
    want: int
    changed: bool = False  # a reason is given
    pending: bool = False  # a held change is described
    as_dstack: bool = True  # dstack's RPSAutoscaler decides the same count
    rule: ScalingRule = RULE
    history: float = math.inf
    holding: bool = False


def rule(**changes: Any) -> ScalingRule:
    return replace(RULE, **changes)


CASES = {
    "from-zero-at-once-within-delay": Case(0, 120, 0, 2, changed=True),
    "from-zero-clipped-to-max": Case(0, 6000, 0, 4, changed=True),
    "up-held-before-delay": Case(1, 180, 9.9, 1, pending=True),
    "up-allowed-at-delay": Case(1, 180, 10, 3, changed=True),
    "down-held-before-delay": Case(3, 60, 19, 3, pending=True),
    "down-allowed-at-delay": Case(3, 60, 20, 1, changed=True),
    "down-to-zero": Case(1, 0, 100, 0, changed=True),
    "down-held-past-the-up-delay": Case(3, 60, 15, 3, pending=True),
    "up-allowed-within-the-down-delay": Case(1, 180, 15, 3, changed=True),
    "clipped-to-max": Case(1, 600, 100, 4, changed=True),
    "clipped-to-min": Case(3, 0, 100, 2, changed=True, rule=rule(minimum=2)),
    "ceil-61-in-60s": Case(1, 61, 100, 2, changed=True),
    "ceil-60-in-60s-no-change": Case(1, 60, 100, 1),
    "ceil-31-in-30s": Case(1, 31, 100, 2, changed=True, rule=rule(window=30)),
    "ceil-90-in-30s": Case(1, 90, 100, 3, changed=True, rule=rule(window=30)),
    "ceil-301-in-300s": Case(1, 301, 100, 2, changed=True, rule=rule(window=300)),
    "ceil-600-in-300s-no-change": Case(2, 600, 100, 2, rule=rule(window=300)),
    "ceil-target-half": Case(1, 61, 100, 3, changed=True, rule=rule(maximum=10, target=0.5)),
    "same-count-no-change": Case(2, 120, 0, 2),
    "zero-stays-zero": Case(0, 0, 0, 0),
    "never-scaled-up": Case(1, 180, None, 3, changed=True),
    "never-scaled-down": Case(3, 0, None, 0, changed=True),
    # A changed range applies at once (dstack holds a count outside it until the delay).
    "range-lowered-clips-at-once": Case(6, 600, 0, 4, changed=True, as_dstack=False),
    "range-raised-clips-at-once": Case(1, 0, 0, 2, changed=True, rule=rule(minimum=2), as_dstack=False),
    "range-raised-from-zero": Case(0, 0, 0, 1, changed=True, rule=rule(minimum=1)),
    # A rollout holds changes, except from zero.
    "holding-up": Case(1, 180, 100, 1, pending=True, holding=True, as_dstack=False),
    "holding-down": Case(3, 0, 100, 3, pending=True, holding=True, as_dstack=False),
    "holding-from-zero": Case(0, 120, 100, 2, changed=True, holding=True),
    "holding-same-count": Case(2, 120, 100, 2, holding=True),
    "holding-range-clips": Case(6, 600, 100, 4, changed=True, holding=True),
    # A restarted agent scales down only after counting a whole window.
    "short-history-holds-down": Case(3, 60, 100, 3, pending=True, history=59, as_dstack=False),
    "short-history-allows-up": Case(1, 180, 100, 3, changed=True, history=0),
    "whole-window-allows-down": Case(3, 60, 100, 1, changed=True, history=60),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decide(case: Case) -> None:
    decision = decide(case.rule, case.current, case.requests, case.since_scaled, case.history, case.holding)
    assert decision.count == case.want
    assert bool(decision.reason) == case.changed, decision
    assert bool(decision.pending) == case.pending, decision
    if case.as_dstack:
        assert decision.count == dstack_count(case.rule, case.current, case.requests, case.since_scaled)


def test_the_table_has_a_good_share_of_dstack_cases_and_the_differences_do_differ() -> None:
    assert sum(c.as_dstack for c in CASES.values()) >= len(CASES) * 2 // 3
    for case in CASES.values():
        if not case.as_dstack:
            assert case.want != dstack_count(case.rule, case.current, case.requests, case.since_scaled)


def test_pending_and_reason_say_what_is_held_and_why() -> None:
    assert decide(RULE, 1, 180, 4).pending == "scale-up to 3 in 6s (scale_up_delay)"
    assert decide(RULE, 3, 60, 5).pending == "scale-down to 1 in 15s (scale_down_delay)"
    assert decide(RULE, 3, 60, 100, history=45).pending == "scale-down to 1 in 15s (counting a whole window)"
    assert decide(RULE, 1, 180, 100, holding=True).pending == "3 after the rollout"
    assert decide(RULE, 0, 90, 0).reason == "1.5 rps over 1m for a target of 1: from zero at once"
    assert decide(RULE, 6, 0, 0).reason == "the range is now 0..4"


# --- RequestRate ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_rate_counts_the_current_second() -> None:
    clock = FakeClock(1000.2)
    rate = RequestRate(clock)
    rate.count()
    rate.count(4)
    clock.advance(0.5)  # the same second
    rate.count()
    assert rate.requests_in(1) == 6 and rate.requests_in(30) == 6 and rate.total == 6


def test_rate_window_includes_the_current_second_and_drops_older_ones() -> None:
    clock = FakeClock()
    rate = RequestRate(clock)
    for _ in range(60):  # one request in each of 60 seconds: 1000 .. 1059
        rate.count()
        clock.advance(1)
    clock.now = 1059
    assert [rate.requests_in(w) for w in (1, 30, 60, 300)] == [1, 30, 60, 60]
    clock.now = 1060  # a new second, nothing counted in it yet
    assert [rate.requests_in(w) for w in (1, 30, 60)] == [0, 29, 59]
    clock.now = 1089
    assert rate.requests_in(30) == 0 and rate.requests_in(60) == 30
    clock.now = 1358  # 1059 is the oldest second of the last 300
    assert rate.requests_in(300) == 1
    clock.now = 1359
    assert rate.requests_in(300) == 0
    assert rate.total == 60


def test_rate_old_seconds_are_zeroed_when_counting_resumes() -> None:
    clock = FakeClock()
    rate = RequestRate(clock)
    rate.count(7)  # second 1000, in the slot that second 1300 reuses
    clock.now = 1100
    rate.count(2)
    clock.now = 1300
    rate.count()
    assert rate.requests_in(300) == 3 and rate.requests_in(1) == 1


def test_rate_a_pause_longer_than_the_history_zeroes_everything() -> None:
    clock = FakeClock()
    rate = RequestRate(clock)
    for _ in range(HISTORY_SECONDS):
        rate.count(3)
        clock.advance(1)
    assert rate.requests_in(300) == 3 * 299  # the current second has nothing yet
    clock.advance(HISTORY_SECONDS + 50)
    assert rate.requests_in(300) == 0
    rate.count()
    assert [rate.requests_in(w) for w in (1, 30, 300)] == [1, 1, 1]
    assert rate.total == 3 * HISTORY_SECONDS + 1


def test_rate_per_second_divides_by_the_window() -> None:
    clock = FakeClock()
    rate = RequestRate(clock)
    rate.count(45)
    assert rate.per_second(30) == 1.5 and rate.per_second(60) == 0.75 and rate.per_second(300) == 0.15


# --- Autoscaler ----------------------------------------------------------------------------

SERVICE = """\
type: service
name: svc
port: 8000
image: app
commands: [serve]
replicas: {replicas}
scaling: {{metric: rps, target: 1, window: 30s, scale_up_delay: 10s, scale_down_delay: 20s}}
"""

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp()


def deployment(text: str) -> Deployment:
    release = Release.of(parse_service(text, "svc.yml"), {})
    return Deployment.load(release.record(1), {})


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def counts(d: Deployment) -> dict[str, int]:
    return {name: group.count for name, group in d.groups.items()}


def test_apply_scales_a_deployment_from_zero_up_and_back_down() -> None:
    clock = FakeClock(T0)
    rate = RequestRate(clock)
    scaler = Autoscaler(rate, clock=clock)
    start = deployment(SERVICE.format(replicas="0..4"))
    assert counts(start) == {"0": 0}

    assert counts(scaler.apply(start)) == {"0": 0}
    assert scaler.groups == {"0": GroupScaling(0, 4, 0, 1.0, 30, 0.0, iso(T0), None)}
    assert scaler.can_idle

    clock.advance(5)
    rate.count(45)  # 1.5 rps over 30s: 2 replicas, from zero at once
    assert counts(scaler.apply(start)) == {"0": 2}
    assert scaler.groups["0"] == GroupScaling(0, 4, 2, 1.0, 30, 1.5, iso(T0 + 5), None)

    clock.advance(5)
    rate.count(100)  # 145 in the window: 4.83 rps, up to 4 (the max) once 10s have passed
    held = scaler.apply(start)
    assert counts(held) == {"0": 2}
    assert scaler.groups["0"].pending == "scale-up to 4 in 5s (scale_up_delay)"
    assert scaler.groups["0"].rps == 4.83 and scaler.groups["0"].last_scaled_at == iso(T0 + 5)
    clock.advance(5)
    assert counts(scaler.apply(start)) == {"0": 4}
    assert scaler.groups["0"].last_scaled_at == iso(T0 + 15) and scaler.groups["0"].pending is None

    clock.advance(30)  # the requests left the window; 20s since the last scaling event
    assert counts(scaler.apply(start)) == {"0": 0}
    assert scaler.groups["0"].desired == 0 and scaler.groups["0"].rps == 0.0


def test_apply_restores_desired_and_last_scaled_at_from_state() -> None:
    saved = GroupScaling(0, 4, 3, 1.0, 30, 2.0, iso(T0), None).to_json()
    restored = GroupScaling.from_json(saved)
    assert restored is not None
    clock = FakeClock(T0 + 5)
    scaler = Autoscaler(RequestRate(clock), restored={"0": restored}, clock=clock)
    assert scaler.can_idle  # from the restored range, before any round
    start = deployment(SERVICE.format(replicas="0..4"))

    assert counts(scaler.apply(start)) == {"0": 3}  # not the range's minimum
    assert scaler.groups["0"].desired == 3 and scaler.groups["0"].last_scaled_at == iso(T0)
    assert "scale_down_delay" in (scaler.groups["0"].pending or "")  # 5s since T0, not 0

    clock.advance(20)  # past the delay, but the restarted agent has counted only 20s
    assert counts(scaler.apply(start)) == {"0": 3}
    assert "counting a whole window" in (scaler.groups["0"].pending or "")
    clock.advance(10)
    assert counts(scaler.apply(start)) == {"0": 0}
    assert scaler.groups["0"].last_scaled_at == iso(T0 + 35)


def test_apply_clips_a_restored_count_to_a_changed_range_at_once() -> None:
    restored = GroupScaling(0, 8, 6, 1.0, 30, 0.0, iso(T0), None)
    clock = FakeClock(T0 + 1)
    scaler = Autoscaler(RequestRate(clock), restored={"0": restored}, clock=clock)
    assert counts(scaler.apply(deployment(SERVICE.format(replicas="1..4")))) == {"0": 4}
    assert (scaler.groups["0"].min, scaler.groups["0"].max) == (1, 4)


def test_can_idle_only_when_a_group_may_reach_zero() -> None:
    clock = FakeClock(T0)
    for replicas, idle in (("0..4", True), ("1..4", False)):
        scaler = Autoscaler(RequestRate(clock), clock=clock)
        scaled = scaler.apply(deployment(SERVICE.format(replicas=replicas)))
        assert scaler.can_idle is idle
        assert counts(scaled) == {"0": 0 if idle else 1}


def test_a_deployment_without_scaling_is_returned_unchanged() -> None:
    clock = FakeClock(T0)
    scaler = Autoscaler(RequestRate(clock), clock=clock)
    fixed = deployment("type: service\nport: 8000\nimage: app\ncommands: [serve]\nreplicas: 2\n")
    assert scaler.apply(fixed) is fixed
    assert scaler.groups == {} and not scaler.can_idle


GROUPS = """\
type: service
port: 8000
image: app
replicas:
  - name: a
    count: 0..2
    commands: [serve a]
    scaling: {metric: rps, target: 1, window: 30s, scale_up_delay: 10s, scale_down_delay: 20s}
  - name: b
    count: 1..10
    commands: [serve b]
    scaling: {metric: rps, target: 2, window: 30s, scale_up_delay: 10s, scale_down_delay: 20s}
  - name: fixed
    count: 1
    commands: [serve fixed]
"""


def test_each_group_scales_in_its_own_range_on_the_same_rate() -> None:
    clock = FakeClock(T0)
    rate = RequestRate(clock)
    scaler = Autoscaler(rate, clock=clock)
    start = deployment(GROUPS)
    assert counts(scaler.apply(start)) == {"a": 0, "b": 1, "fixed": 1}

    clock.advance(15)
    rate.count(270)  # 9 rps: a wants 9 (max 2), b wants ceil(9 / 2) = 5
    scaled = scaler.apply(start)
    assert counts(scaled) == {"a": 2, "b": 5, "fixed": 1}
    assert set(scaler.groups) == {"a", "b"}
    assert scaler.groups["a"].rps == scaler.groups["b"].rps == 9.0
    assert (scaler.groups["a"].max, scaler.groups["b"].max) == (2, 10)
    assert scaled.groups["a"].config.commands == ["serve a"]  # only the counts change
