"""The rollout planner, step by step, as the agent would drive it."""

from __future__ import annotations

from dstackctl.agent.rollout_plan import Observed, Target, plan


def _r(key: str, num: int, dep: int, *, ready: bool = True, failed: bool = False) -> Observed:
    return Observed(
        key=key,
        replica_num=num,
        deployment_num=dep,
        config_hash=f"h{dep}",
        running=not failed,
        ready=ready and not failed,
        failed=failed,
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


def test_restart_with_the_same_config_counts_the_deployment_number() -> None:
    same_hash = [Observed("a", 0, 0, "h", True, True, False)]
    step = plan(Target(1, "h", 1), same_hash, set())
    assert step.rolling and step.create == [0]


def test_create_failures_are_not_retried_and_are_reported() -> None:
    step = plan(Target(0, "h0", 2), [_r("a", 0, 0)], {1})
    assert step.create == [] and step.failed == [1] and not step.complete


def test_not_ready_replicas_count_against_a_deadline_even_when_nothing_old_serves() -> None:
    # a redeploy of a service none of whose replicas was ready: the new one must still be
    # held to the rollout's deadline, or the rollout could never end
    step = plan(T1, [_r("a", 0, 0, ready=False), _r("n0", 0, 1, ready=False)], set())
    assert not step.rolling
    assert step.waiting_for == ["n0"] and step.remove == ["a"]
