"""The real service agent, without Docker: its reconcile loop, ProbeRunner, publisher and
endpoint run in this process against a FakeEngine whose containers are local sockets.

Specs go in through the CLI's own `submit`/`start_rollout`; outcomes are read from state.json
(every write is recorded, so "never ready" means no state.json the agent wrote said so).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_scenarios import Scenario, service_yaml
from fake_engine import LABEL_DEPLOYMENT, LABEL_REPLICA, LABEL_RUN, FakeEngine, ReplicaSpec
from helpers import wait_until

from dstackctl.docker import DockerError

pytestmark = [pytest.mark.slow]


@pytest.fixture
def sc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scenario]:
    scenario = Scenario(tmp_path, monkeypatch)
    try:
        yield scenario
    finally:
        scenario.close()


# --- the fake itself -------------------------------------------------------------------------


def _answer(port: int | None) -> str:
    """What a replica's port does with one request: answers, refused or silent."""
    if port is None:
        return "no port"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return "answers" if sock.recv(64).startswith(b"HTTP/1.1 200") else "garbage"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "silent"


def _fake_spec(num: int, behaviour: str) -> ReplicaSpec:
    labels = {LABEL_RUN: "fake", LABEL_REPLICA: str(num), LABEL_DEPLOYMENT: "0"}
    return ReplicaSpec(
        name=f"fake-{num}",
        image="fake/replica:1",
        labels=labels,
        container_port=8000,
        environment={"FAKE_BEHAVIOUR": behaviour},
    )


def test_the_fake_engine_plays_each_behaviour() -> None:
    engine = FakeEngine()
    try:
        replicas = {
            behaviour: engine.create_and_start(_fake_spec(num, behaviour))
            for num, behaviour in enumerate(
                ["serve", "no_listen", "slow_start:0.5", "hang_after:0.5", "crash_after:0.5", "exit:4"]
            )
        }
        assert {r.status for r in replicas.values()} == {"running"}  # as Docker said at start
        for replica in replicas.values():
            if hasattr(replica, "ip_address"):
                assert (replica.ip_address, replica.container_port) == ("127.0.0.1", replica.host_port)
        assert _answer(replicas["serve"].host_port) == "answers"
        assert _answer(replicas["no_listen"].host_port) == "refused"
        assert _answer(replicas["slow_start:0.5"].host_port) == "refused"
        assert _answer(replicas["hang_after:0.5"].host_port) == "answers"
        listed = {r.id: r for r in engine.list_replicas({LABEL_RUN: "fake"})}
        exited = listed[replicas["exit:4"].id]
        assert (exited.status, exited.exit_code, exited.host_port) == ("exited", 4, None)
        wait_until(lambda: _answer(replicas["slow_start:0.5"].host_port) == "answers", 5, "a slow start")
        wait_until(lambda: _answer(replicas["hang_after:0.5"].host_port) == "silent", 5, "a hang")
        crashed = wait_until(
            lambda: (
                engine.inspect(replicas["crash_after:0.5"].id).status == "exited"
                and engine.inspect(replicas["crash_after:0.5"].id)
            ),
            5,
            "a crash",
        )
        assert crashed.exit_code == 1
        serving = replicas["serve"].id
        with engine.outage(stop_containers=True), pytest.raises(DockerError, match="Docker is not running"):
            engine.list_replicas({LABEL_RUN: "fake"})
        assert engine.inspect(serving).status == "exited"
        engine.start(serving)
        assert _answer(engine.inspect(serving).host_port) == "answers"
        engine.stop_and_remove(serving, 10)
        assert serving not in {r.id for r in engine.list_replicas({LABEL_RUN: "fake"})}
        assert engine.started() == [serving] and engine.stopped() == [serving]
    finally:
        assert engine.shutdown() == []


def _ever_ready(sc: Scenario, container_ids: set[str]) -> list[str]:
    """Container ids of `container_ids` that some state.json write showed ready."""
    return sorted(
        {
            row["container_id"]
            for state in sc.store.states
            for row in state.get("replicas") or []
            if row.get("container_id") in container_ids and row.get("ready")
        }
    )


# --- replicas without probes ----------------------------------------------------------------


# `exit:3`: exited by the time Docker lists it; `exit:3@1.5`: listed running (nothing listens)
# for a few reconcile rounds first.
EXITS = pytest.mark.parametrize("behaviour", ["exit:3", "exit:3@1.5"])


@EXITS
def test_a_probe_less_replica_that_exits_at_once_fails_and_is_never_ready(
    sc: Scenario, behaviour: str
) -> None:
    """Design 10: without probes a replica is ready only once a TCP connection to it succeeds;
    one that exits first is failed, never ready (and never in the endpoint's rotation)."""
    sc.submit(service_yaml(behaviour=behaviour, probes=False))
    sc.start_agent()
    [row] = sc.wait_rows(lambda rows: rows[0]["status"] == "failed", "replica 0 to be failed")
    assert row["exit_code"] == 3 and "exited with code 3" in row["message"]
    assert sc.engine.created_ids() == [row["container_id"]]
    assert _ever_ready(sc, {row["container_id"]}) == [], "a replica that never listened was ready"


def test_a_probe_less_replica_that_listens_becomes_ready(sc: Scenario) -> None:
    sc.submit(service_yaml(behaviour="serve", probes=False))
    sc.start_agent()
    [row] = sc.wait_ready(replicas=1, deployment=0)
    assert row["probes"] == []
    assert sc.engine.created_ids() == [row["container_id"]]
    assert sc.state()["status"] == "running"


# --- rollouts -------------------------------------------------------------------------------


def _deploy_ready(sc: Scenario, replicas: int, probes: bool = True) -> set[str]:
    sc.submit(service_yaml(replicas=replicas, probes=probes, env={"VERSION": "1"}))
    sc.start_agent()
    rows = sc.wait_ready(replicas=replicas, deployment=0)
    return {r["container_id"] for r in rows}


def _assert_rolled_back_to(sc: Scenario, old_ids: set[str]) -> None:
    """The failed deployment is gone, the old replicas serve and were never drained or stopped."""
    rows = sc.wait_ready(replicas=len(old_ids), deployment=0)
    assert {r["container_id"] for r in rows} == old_ids
    assert sc.served_deployment() == 0
    assert not old_ids & set(sc.engine.stopped()), "an old replica was stopped during the rollout"
    for cid in old_ids:
        container = sc.engine.container(cid)
        assert container is not None and container.status == "running"
    draining = [
        row
        for state in sc.store.states
        for row in state.get("replicas") or []
        if row.get("container_id") in old_ids and row["status"] == "terminating"
    ]
    assert draining == [], "an old replica was drained during the rollout"
    new_ids = set(sc.engine.created_ids(deployment_num=1))
    assert new_ids, "the rollout created no replica"
    assert new_ids <= set(sc.engine.stopped()), "a replica of the failed deployment was left behind"


def _roll_out_a_crash(sc: Scenario, replicas: int) -> set[str]:
    old_ids = _deploy_ready(sc, replicas)
    assert sc.roll_out(service_yaml(replicas=replicas, behaviour="exit:1", env={"VERSION": "2"})) == 1
    rollout = sc.wait_rollout("rolled_back")
    assert "replica=0 (deployment 1) failed" in (rollout.get("reason") or ""), rollout
    _assert_rolled_back_to(sc, old_ids)
    return old_ids


def test_a_rollout_to_a_crashing_replica_rolls_back_without_touching_the_old_ones(sc: Scenario) -> None:
    _roll_out_a_crash(sc, replicas=2)


def test_a_rollback_gives_the_failed_replicas_own_reason(sc: Scenario) -> None:
    """The reason names how the new replica failed, not the old replica of the same number."""
    _deploy_ready(sc, replicas=1)
    sc.roll_out(service_yaml(behaviour="exit:7", env={"VERSION": "2"}))
    rollout = sc.wait_rollout("rolled_back")
    assert rollout.get("reason") == "replica=0 (deployment 1) failed: exited with code 7", rollout


@EXITS
def test_a_rollout_to_a_probe_less_replica_that_exits_at_once_rolls_back(
    sc: Scenario, behaviour: str
) -> None:
    old_ids = _deploy_ready(sc, replicas=2, probes=False)
    sc.roll_out(service_yaml(replicas=2, behaviour=behaviour, probes=False, env={"VERSION": "2"}))
    rollout = sc.wait_rollout("rolled_back")
    assert "replica=0 (deployment 1) failed" in (rollout.get("reason") or ""), rollout
    _assert_rolled_back_to(sc, old_ids)
    new_ids = set(sc.engine.created_ids(deployment_num=1))
    assert _ever_ready(sc, new_ids) == [], "a new replica that never listened was ready"


def test_a_successful_rollout_replaces_every_replica(sc: Scenario) -> None:
    old_ids = _deploy_ready(sc, replicas=2)
    assert sc.roll_out(service_yaml(replicas=2, env={"VERSION": "2"})) == 1
    sc.wait_rollout("done")
    rows = sc.wait_ready(replicas=2, deployment=1)
    new_ids = {r["container_id"] for r in rows}
    assert new_ids == set(sc.engine.created_ids(deployment_num=1))
    assert not new_ids & old_ids
    assert old_ids <= set(sc.engine.stopped())
    assert sc.served_deployment() == 1
    # A surge of one: never more than replicas + 1 containers running at once.
    assert sc.engine.peak_running["svc"] <= 3


# --- replicas that go wrong later -------------------------------------------------------------


def test_a_replica_that_hangs_leaves_rotation_and_is_replaced(sc: Scenario) -> None:
    # ~15 s: replaced after 6 probe failures in a row, each a 1 s timeout and a 1 s interval.
    sc.submit(service_yaml(behaviour="hang_after:2,serve", extra="retry:\n  on_events: [error]\n"))
    sc.start_agent()
    [first] = sc.wait_ready(replicas=1, deployment=0)
    hung = first["container_id"]
    [row] = sc.wait_rows(
        lambda rows: rows[0]["container_id"] not in (None, hung) and rows[0]["ready"],
        "the hung replica to be replaced by a ready one",
        timeout=40,
    )
    assert row["message"] == "replaced 1 time (last: stopped answering its probes)", row
    assert hung in sc.engine.stopped()
    # Out of rotation before it was replaced: some write showed it running and not ready.
    left = [
        r
        for state in sc.store.states
        for r in state.get("replicas") or []
        if r.get("container_id") == hung and r["status"] == "running" and not r["ready"]
    ]
    assert left, "the hung replica stayed in rotation until it was replaced"
    assert len(sc.engine.created_ids()) == 2


def test_a_docker_outage_is_reported_and_stopped_replicas_start_again(sc: Scenario) -> None:
    sc.submit(service_yaml())
    sc.start_agent()
    [row] = sc.wait_ready(replicas=1, deployment=0)
    cid = row["container_id"]
    with sc.engine.outage(stop_containers=True):
        problem = wait_until(
            lambda: sc.state().get("engine_problem"), 15, "state.json to report the engine problem"
        )
        assert "Docker is not running" in problem
    wait_until(
        lambda: sc.state().get("engine_problem") is None, 15, "the engine problem to clear in state.json"
    )
    [row] = sc.wait_ready(replicas=1, deployment=0)
    assert row["container_id"] == cid
    assert sc.engine.started() == [cid]
    assert len(sc.engine.created_ids()) == 1


# --- agent restarts ---------------------------------------------------------------------------


def _restart_agent(sc: Scenario) -> int:
    """Stop the agent, start a new one on the same store and engine; returns the number of
    state.json writes before the new one started."""
    sc.agents[-1].stop()
    mark = len(sc.store.states)
    sc.start_agent()
    return mark


def test_a_restarted_agent_adopts_its_containers(sc: Scenario) -> None:
    ids = _deploy_ready(sc, replicas=2)
    created = len(sc.engine.created_ids())
    mark = _restart_agent(sc)
    wait_until(
        lambda: any(
            {r["container_id"] for r in s["replicas"] if r["ready"]} == ids for s in sc.store.states[mark:]
        ),
        15,
        "the new agent to report both replicas ready",
    )
    assert len(sc.engine.created_ids()) == created
    assert sc.engine.stopped() == []
    assert {r["container_id"] for r in sc.wait_ready(replicas=2, deployment=0)} == ids


def test_a_restart_after_a_rollback_keeps_the_previous_deployment(sc: Scenario) -> None:
    old_ids = _roll_out_a_crash(sc, replicas=1)
    failed_creates = len(sc.engine.created_ids(deployment_num=1))
    mark = _restart_agent(sc)
    lists = sc.engine.list_count()
    # Several reconcile rounds of the new agent, and a write of it with the old replica ready.
    wait_until(lambda: sc.engine.list_count() >= lists + 6, 15, "six reconcile rounds of the new agent")
    wait_until(
        lambda: any(
            [r["container_id"] for r in s["replicas"] if r["ready"]] == sorted(old_ids)
            for s in sc.store.states[mark:]
        ),
        15,
        "the new agent to report the old replica ready",
    )
    assert len(sc.engine.created_ids(deployment_num=1)) == failed_creates, "the failed deployment was retried"
    assert sc.rollout_state().get("state") == "rolled_back"
    assert sc.served_deployment() == 0
    assert {r["container_id"] for r in sc.wait_ready(replicas=1, deployment=0)} == old_ids
