"""RouterWorkers: the agent's side of an SMG router group, against the in-process fake router."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from fake_router import FakeRouter
from helpers import wait_until

from dstackctl.agent.router_workers import RouterWorkers
from dstackctl.replica import Replica


def _replica(name: str, ip: str | None, host_port: int | None = None) -> Replica:
    return Replica(
        id=name,
        name=name,
        labels={},
        status="running",
        exit_code=None,
        oom_killed=False,
        host_port=host_port,
        started_at=None,
        ip_address=ip,
        container_port=8000,
    )


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    with FakeRouter() as fake:
        yield fake


def _router_container(router: FakeRouter) -> Replica:
    return _replica("router", "10.0.0.9", urlsplit(router.base_url).port)


def test_workers_join_as_they_become_ready_leave_as_they_go_and_come_back_after_a_restart(
    router: FakeRouter,
) -> None:
    workers = RouterWorkers(resync_seconds=0.2)
    front = _router_container(router)
    a, b = _replica("a", "10.0.0.1"), _replica("b", "10.0.0.2")
    try:
        workers.tick(front, [(a, "workers/0/0")])
        wait_until(lambda: router.urls() == {"http://10.0.0.1:8000"} or None, 5, "worker a registered")
        workers.tick(front, [(a, "workers/0/0"), (b, "workers/1/0")])
        both = {"http://10.0.0.1:8000", "http://10.0.0.2:8000"}
        wait_until(lambda: router.urls() == both or None, 5, "worker b registered")
        workers.tick(front, [(b, "workers/1/0")])  # a left rotation (drains)
        wait_until(lambda: router.urls() == {"http://10.0.0.2:8000"} or None, 5, "worker a removed")
        router.restart()  # the router forgot its workers; the periodic re-sync brings them back

        def resynced() -> bool | None:
            workers.tick(front, [(b, "workers/1/0")])
            return router.urls() == {"http://10.0.0.2:8000"} or None

        wait_until(resynced, 5, "worker b registered again after the restart")
        assert workers.error is None
    finally:
        workers.close()


def test_nothing_happens_without_a_running_router_and_a_dead_router_is_an_error_not_a_crash(
    router: FakeRouter,
) -> None:
    workers = RouterWorkers(resync_seconds=0.2)
    workers.tick(None, [(_replica("a", "10.0.0.1"), "workers/0/0")])
    assert router.take_calls() == []
    front = _router_container(router)
    router.stop()
    workers.tick(front, [(_replica("a", "10.0.0.1"), "workers/0/0")])
    workers.close()
    assert workers.error is not None and "127.0.0.1" in workers.error
