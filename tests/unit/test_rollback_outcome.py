"""A rollback's outcome (issue 15 item 10): `rolled_back` when the previous deployment is back as
it was, ready or not; `rollback_failed` only when the rollback could not restore it.

The real agent runs on the fake engine (tests/agent_scenarios.py); the rollout is asked with a
short deadline so that one that waits for readiness ends within the test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from agent_scenarios import NAME, Scenario, load, service_yaml
from helpers import wait_until

from dstackctl.agent.desired import Desired
from dstackctl.agent.rollout_plan import Observed, Plan, Target, plan
from dstackctl.agent.rollouts import RolloutMonitor
from dstackctl.deploy import Release, start_rollout
from dstackctl.status import RolloutStatus

SLOW = pytest.mark.slow

SHORT_DEADLINE = 3  # seconds: each new replica of the rollout must be ready within it
ENDED = ("done", "rolled_back", "rollback_failed")


@pytest.fixture
def sc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scenario]:
    scenario = Scenario(tmp_path, monkeypatch)
    try:
        yield scenario
    finally:
        scenario.close()


def _roll_out(sc: Scenario, text: str, deadline: int = SHORT_DEADLINE) -> dict[str, Any]:
    """Ask for a rollout with a short deadline; the rollout as it ended."""
    loaded, env = load(text)
    start_rollout(sc.store, NAME, Release.of(loaded, env), deadline)
    return wait_until(
        lambda: (rollout := sc.rollout_state()).get("state") in ENDED and rollout,
        30 + 3 * deadline,
        "the rollout to end",
    )


def _deploy_never_ready(sc: Scenario, replicas: int) -> set[str]:
    """Deployment 0, whose replicas run but never pass their probe; their container ids."""
    sc.submit(service_yaml(replicas=replicas, behaviour="no_listen", env={"VERSION": "1"}))
    sc.start_agent()
    rows = sc.wait_rows(
        lambda rows: (
            len(rows) == replicas
            and all(r["status"] == "running" and r["probes"][0]["last_error"] for r in rows)
        ),
        f"{replicas} running replicas whose probe failed",
    )
    assert not any(r["ready"] for r in rows)
    return {r["container_id"] for r in rows}


def _assert_deployment_0_is_back_not_ready(sc: Scenario, replicas: int) -> None:
    rows = sc.wait_rows(
        lambda rows: len(rows) == replicas and all(r["deployment_num"] == 0 for r in rows),
        "only replicas of deployment 0",
    )
    assert all(r["status"] == "running" and not r["ready"] for r in rows), rows
    assert sc.served_deployment() == 0
    new_ids = set(sc.engine.created_ids(deployment_num=1))
    assert new_ids and new_ids <= set(sc.engine.stopped()), "a replica of the failed deployment was left"


@SLOW
@pytest.mark.parametrize("new_behaviour", ["exit:1", "no_listen"])
def test_a_rollback_to_a_deployment_that_was_never_ready_ends_rolled_back(
    sc: Scenario, new_behaviour: str
) -> None:
    """The previous deployment was not ready before the rollout; once its replicas are back (not
    ready, as before), the rollback has restored it: `rolled_back`, not `rollback_failed`."""
    _deploy_never_ready(sc, replicas=2)
    rollout = _roll_out(sc, service_yaml(replicas=2, behaviour=new_behaviour, env={"VERSION": "2"}))
    assert rollout["state"] == "rolled_back", rollout
    reason = rollout.get("reason") or ""
    assert re.match(r"replica=[01] \(deployment 1\) ", reason), reason  # nothing old served: both at once
    assert "not ready before the rollout either" in reason, reason
    _assert_deployment_0_is_back_not_ready(sc, replicas=2)


@SLOW
def test_a_rollback_that_cannot_make_a_ready_replica_ready_again_fails(sc: Scenario) -> None:
    """Replica 0 of deployment 0 served before the rollout; the rollback brings it back but the new
    container never gets ready: that is not the previous state, so `rollback_failed`."""
    sc.engine.script[(0, 0)] = "serve,no_listen"  # its first container serves, the next does not
    sc.engine.script[(0, 1)] = "serve"
    sc.engine.script[(1, 1)] = "exit:1"
    sc.submit(service_yaml(replicas=2, env={"VERSION": "1"}))
    sc.start_agent()
    sc.wait_ready(replicas=2, deployment=0)
    # A longer deadline: the new replica 0 must get ready within it even on a busy machine.
    rollout = _roll_out(sc, service_yaml(replicas=2, env={"VERSION": "2"}), deadline=8)
    assert rollout["state"] == "rollback_failed", rollout
    assert "the rollback failed too: replica=0 (deployment 0) was not ready" in rollout["reason"], rollout


# --- the monitor alone, on plans (fast) ----------------------------------------------------------


def _desired(number: int, timeout: int = 600) -> Desired:
    rollout = SimpleNamespace(timeout=timeout)
    return cast(
        Desired,
        SimpleNamespace(current=SimpleNamespace(number=number), spec=SimpleNamespace(rollout=rollout)),
    )


def _plan(replicas: list[tuple[int, bool, bool, bool]], slots: int = 2) -> Plan:
    """A plan for a target of `slots` replicas; each replica is (num, owned, ready, failed)."""
    observed = [
        Observed(f"c{num}{'o' if owned else 'x'}", ("0", num), owned, not failed, ready, failed)
        for num, owned, ready, failed in replicas
    ]
    return plan(Target(tuple(("0", n) for n in range(slots))), observed, set())


def _follow(monitor: RolloutMonitor, steps: Plan) -> str:
    monitor.follow(_desired(1), steps, lambda slot: "exited with code 1", lambda key: (key, ""))
    assert monitor.status is not None
    return monitor.status.state


def _rolling_back(serving_old: list[tuple[int, bool, bool, bool]]) -> RolloutMonitor:
    """A monitor whose rollout from 0 to 1 began with `serving_old` and whose new replica failed."""
    monitor = RolloutMonitor(RolloutStatus("in_progress", from_deployment=0, to_deployment=1))
    assert _follow(monitor, _plan([(n, False, ready, failed) for n, _, ready, failed in serving_old])) == (
        "in_progress"
    )
    assert _follow(monitor, _plan([(0, True, False, True)])) == "rolling_back"
    return monitor


def test_the_monitor_ends_rolled_back_once_a_never_ready_deployment_is_back_in_place() -> None:
    monitor = _rolling_back([(0, False, False, False), (1, False, False, False)])
    assert monitor.status is not None and monitor.status.serving_at_start == ()
    assert _follow(monitor, _plan([(0, True, False, False)])) == "rolling_back"  # replica 1 missing
    assert _follow(monitor, _plan([(0, True, False, False), (1, True, False, True)])) == "rolled_back"
    assert monitor.status is not None
    assert "deployment 0 is back as it was, replica=0, replica=1 not ready" in (monitor.status.reason or "")


def test_the_monitor_waits_for_the_replicas_that_served_before_the_rollout() -> None:
    monitor = _rolling_back([(0, False, True, False), (1, False, False, False)])
    assert monitor.status is not None and monitor.status.serving_at_start == (("0", 0),)
    assert _follow(monitor, _plan([(0, True, False, False), (1, True, False, False)])) == "rolling_back"
    assert _follow(monitor, _plan([(0, True, True, False), (1, True, False, False)])) == "rolled_back"


def test_the_replicas_serving_at_the_start_survive_a_round_trip_through_state_json() -> None:
    status = RolloutStatus("rolling_back", 0, 1, serving_at_start=(("0", 0), ("workers", 2)))
    assert RolloutStatus.from_json(json.loads(json.dumps(status.to_json()))) == status
    older = {"state": "rolling_back", "from_deployment": 0, "to_deployment": 1}
    restored = RolloutStatus.from_json(older)
    assert restored is not None and restored.serving_at_start is None
