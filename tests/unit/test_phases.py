"""The replica book: phases move only as the design allows, and a wanted replica always has a row."""

from __future__ import annotations

from dstackctl.agent.phases import Container, Phase, ReplicaBook, ReplicaKey

KEY = ReplicaKey("0", 0, 1)


def _container(status: str, cid: str = "c0") -> Container:
    return Container(id=cid, name=f"svc-0-{cid}", docker_status=status, config_hash="h", host_port=30000)


def test_a_replica_that_exits_before_it_was_ready_is_failed_and_never_ready() -> None:
    book = ReplicaBook()
    seen: list[bool] = []
    book.subscribe(lambda _before, after: seen.append(bool(after and after.ready)))
    book.observe(KEY, _container("running"))
    book.observe(KEY, _container("exited"))
    book.probed("c0", True, (), True)  # a connect check that raced the exit must not make it ready

    [state] = book.replicas()
    assert state.phase is Phase.FAILED
    assert book.in_rotation() == {}
    assert not any(seen)


def test_ready_then_unready_then_ready_again_follows_the_probes() -> None:
    book = ReplicaBook()
    book.observe(KEY, _container("running"))
    phases = []
    for in_rotation in (True, False, True):
        book.probed("c0", in_rotation, (), True)
        phases.append(book.replicas()[0].phase)
    assert phases == [Phase.READY, Phase.UNREADY, Phase.READY]
    assert book.in_rotation() == {"c0": 30000}


def test_a_wanted_replica_whose_container_is_removed_keeps_a_row_at_once() -> None:
    book = ReplicaBook()
    book.want([KEY])
    book.observe(KEY, _container("exited"))
    book.removed("c0")  # replaced under `retry`: the new container comes in a later round
    [state] = book.replicas()
    assert (state.key, state.phase, state.container) == (KEY, Phase.PROVISIONING, None)


def test_a_removed_replica_that_is_not_wanted_leaves_no_row() -> None:
    book = ReplicaBook()
    book.want([])
    book.observe(KEY, _container("running"))
    book.drain("c0")
    book.removed("c0")
    assert book.replicas() == []
