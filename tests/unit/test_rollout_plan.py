"""The rollout planner, step by step, as the agent would drive it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from dstackctl.agent import rollout_plan
from dstackctl.agent.desired import Deployment
from dstackctl.agent.rollout_plan import Observed, Plan, Slot
from dstackctl.spec_document import DeploymentRecord

# Most cases are about a service without groups: one group, "0", and a deployment owns the
# containers started for it. Target(dep, hash, n) and _r(key, num, dep) say that briefly.


@dataclass(frozen=True)
class Target:
    deployment_num: int
    config_hash: str
    replicas: int


@dataclass(frozen=True)
class _R:
    key: str
    num: int
    dep: int
    ready: bool
    failed: bool


def _r(key: str, num: int, dep: int, *, ready: bool = True, failed: bool = False) -> _R:
    return _R(key, num, dep, ready and not failed, failed)


def plan(target: Target, observed: list[_R], create_failed: set[int]) -> Plan:
    slots = tuple(("0", num) for num in range(target.replicas))
    seen = [
        Observed(r.key, ("0", r.num), r.dep == target.deployment_num, not r.failed, r.ready, r.failed)
        for r in observed
    ]
    result = rollout_plan.plan(rollout_plan.Target(slots), seen, {("0", n) for n in create_failed})
    return replace(
        result,
        create=[num for _, num in result.create],  # type: ignore[misc]
        failed=[num for _, num in result.failed],  # type: ignore[misc]
    )


T1 = Target(1, "h1", 2)


def test_first_start_creates_every_replica_at_once() -> None:
    p = plan(Target(0, "h0", 3), [], set())
    assert (p.create, p.rolling, p.complete) == ([0, 1, 2], False, False)


def test_steady_state_is_complete_and_does_nothing() -> None:
    p = plan(Target(0, "h0", 2), [_r("a", 0, 0), _r("b", 1, 0)], set())
    assert p.complete and not (p.create or p.drain or p.remove)


def test_rollout_goes_one_replica_at_a_time_with_a_surge_of_one() -> None:
    old = [_r("a", 0, 0), _r("b", 1, 0)]
    step = plan(T1, old, set())
    assert (step.create, step.drain, step.rolling) == ([0], [], True)
    # the new replica 0 is starting: wait, retire nothing
    step = plan(T1, [*old, _r("n0", 0, 1, ready=False)], set())
    assert (step.create, step.drain, step.waiting_for) == ([], [], ["n0"])
    # ready: drain the old replica 0 (only that one)
    step = plan(T1, [*old, _r("n0", 0, 1)], set())
    assert (step.create, step.drain) == ([], ["a"])
    # old 0 gone: start new replica 1
    step = plan(T1, [old[1], _r("n0", 0, 1)], set())
    assert step.create == [1]
    step = plan(T1, [old[1], _r("n0", 0, 1), _r("n1", 1, 1)], set())
    assert step.drain == ["b"]
    step = plan(T1, [_r("n0", 0, 1), _r("n1", 1, 1)], set())
    assert step.complete and not step.rolling


def test_a_failed_new_replica_is_reported_during_a_rollout() -> None:
    step = plan(T1, [_r("a", 0, 0), _r("b", 1, 0), _r("n0", 0, 1, failed=True)], set())
    assert step.rolling and step.failed == [0]
    assert step.create == [] and step.drain == []
    step = plan(T1, [_r("a", 0, 0), _r("b", 1, 0)], {0})
    assert step.failed == [0]


def test_rollback_is_a_rollout_to_the_previous_deployment() -> None:
    # replica 0 was replaced by deployment 1, whose replica 1 never got ready
    back = Target(0, "h0", 2)
    observed = [_r("n0", 0, 1), _r("n1", 1, 1, ready=False), _r("b", 1, 0)]
    step = plan(back, observed, set())
    assert step.remove == ["n1"]  # serves nothing: removed at once
    assert step.create == [0]  # the replaced replica comes back first...
    step = plan(back, [_r("n0", 0, 1), _r("b", 1, 0), _r("a2", 0, 0)], set())
    assert step.drain == ["n0"]  # ...and only then the new one leaves
    step = plan(back, [_r("b", 1, 0), _r("a2", 0, 0)], set())
    assert step.complete


def test_scaling_in_place_adds_or_drains_without_a_rollout() -> None:
    up = plan(Target(0, "h0", 3), [_r("a", 0, 0), _r("b", 1, 0)], set())
    assert (up.create, up.rolling) == ([2], False)
    down = plan(Target(0, "h0", 1), [_r("a", 0, 0), _r("b", 1, 0)], set())
    assert (down.drain, down.create, down.rolling) == (["b"], [], False)


def test_duplicates_keep_the_ready_one() -> None:
    step = plan(Target(0, "h0", 1), [_r("x", 0, 0, ready=False), _r("y", 0, 0)], set())
    assert step.remove == ["x"] and step.create == []


GROUPS = {
    "type": "service",
    "port": 8000,
    "replicas": [
        {"name": "router", "count": 1, "image": "r", "router": {"type": "smg"}},
        {"name": "workers", "count": 2, "image": "w"},
    ],
}


def _deployment(number: int, config: dict[str, Any], restart: bool = False) -> Deployment:
    record = DeploymentRecord(number, f"h{number}", 3, config, group_replicas={"router": 1, "workers": 2})
    return Deployment.load(replace(record, restart=restart), {})


def test_a_deployment_owns_containers_of_groups_it_did_not_change_unless_it_restarts() -> None:
    before = _deployment(0, GROUPS)
    changed = {**GROUPS, "replicas": [GROUPS["replicas"][0], {"name": "workers", "count": 2, "image": "w2"}]}
    after = _deployment(1, changed)
    router, workers = before.groups["router"], before.groups["workers"]
    assert after.groups["router"].spec_hash == router.spec_hash
    assert after.groups["workers"].spec_hash != workers.spec_hash
    assert after.owns("router", 0, "h0", router.spec_hash)  # kept as it is
    assert not after.owns("workers", 0, "h0", workers.spec_hash)  # replaced
    assert after.owns("workers", 1, "h1")  # started for it
    assert not after.owns("router", 0, "h0", "")  # a container from before group hashes
    restart = _deployment(1, GROUPS, restart=True)  # `redeploy` of the same config
    assert not restart.owns("router", 0, "h0", router.spec_hash)
    assert not after.owns("gone", 0, "h1")
    assert not before.owns("router", 1, "h1", router.spec_hash)  # a rollback adopts nothing newer


def test_create_failures_are_not_retried_and_are_reported() -> None:
    step = plan(Target(0, "h0", 2), [_r("a", 0, 0)], {1})
    assert step.create == [] and step.failed == [1] and not step.complete


def test_not_ready_replicas_count_against_a_deadline_even_when_nothing_old_serves() -> None:
    # a redeploy of a service none of whose replicas was ready: the new one must still be
    # held to the rollout's deadline, or the rollout could never end
    step = plan(T1, [_r("a", 0, 0, ready=False), _r("n0", 0, 1, ready=False)], set())
    assert not step.rolling
    assert step.waiting_for == ["n0"] and step.remove == ["a"]


# --- replica groups ----------------------------------------------------------------------


def _g(key: str, slot: Slot, owned: bool, ready: bool = True) -> Observed:
    return Observed(key, slot, owned, True, ready, False)


def test_groups_start_all_their_slots_at_once() -> None:
    target = rollout_plan.Target((("router", 0), ("workers", 0), ("workers", 1)))
    step = rollout_plan.plan(target, [], set())
    assert step.create == [("router", 0), ("workers", 0), ("workers", 1)]


def test_a_rollout_replaces_only_the_replicas_the_target_does_not_own() -> None:
    # The router's group did not change: the target owns its container, which stays.
    target = rollout_plan.Target((("router", 0), ("workers", 0)))
    router = _g("r", ("router", 0), owned=True)
    old_worker = _g("w", ("workers", 0), owned=False)
    step = rollout_plan.plan(target, [router, old_worker], set())
    assert (step.create, step.drain, step.rolling) == ([("workers", 0)], [], True)
    new_worker = _g("w2", ("workers", 0), owned=True)
    step = rollout_plan.plan(target, [router, old_worker, new_worker], set())
    assert step.drain == ["w"]
    step = rollout_plan.plan(target, [router, new_worker], set())
    assert step.complete and not step.drain and not step.remove


def test_old_replicas_are_replaced_in_the_order_of_the_groups() -> None:
    target = rollout_plan.Target((("a", 0), ("b", 0)))
    old = [_g("ob", ("b", 0), owned=False), _g("oa", ("a", 0), owned=False)]
    new = [_g("na", ("a", 0), owned=True), _g("nb", ("b", 0), owned=True)]
    assert rollout_plan.plan(target, [*old, *new], set()).drain == ["oa"]
