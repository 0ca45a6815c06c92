"""Passive ejection: the endpoint takes a replica that real requests found dead or hung out of
its rotation, keeps it out until `readmit`, and sends new requests where fewer are in flight."""

from __future__ import annotations

import contextlib
import logging
import socket

import pytest
import requests
from helpers import wait_until
from test_proxy_pool import WAIT, Upstream, get, no_startup_grace, upstream
from test_proxy_timeouts import Silent, endpoint_with, silent

from dstackctl.endpoint_limits import EndpointLimits
from dstackctl.proxy import Endpoint

__all__ = ["no_startup_grace", "silent", "upstream"]  # fixtures, used here too


@pytest.fixture
def dead() -> int:
    """A port that refuses connections: bound for a moment, never listened on."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return int(unused.getsockname()[1])


def test_a_replica_that_refuses_connections_leaves_the_rotation(
    dead: int, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dstackctl.proxy")
    endpoint = endpoint_with(EndpointLimits(eject_after_failures=2), dead=dead, live=upstream.port)
    try:
        answers = [get(endpoint, "/text").status_code for _ in range(8)]
        ejected = endpoint.ejected()
    finally:
        endpoint.close()

    assert answers == [200] * 8  # each refused connection was retried on the live replica
    assert ejected == {"dead"}
    [line] = [r.getMessage() for r in caplog.records if "out of rotation" in r.getMessage()]
    assert "dead" in line and "2 failed requests in a row" in line


def with_a_hung_replica(silent: Silent, upstream: Upstream) -> tuple[Endpoint, list[int]]:
    """An endpoint with the hung replica and a good one, and the statuses of four requests
    (two to each: two 504s after the 1 s read timeout, which eject the hung one)."""
    endpoint = endpoint_with(
        EndpointLimits(read_timeout=1, eject_after_failures=2), hung=silent.port, ok=upstream.port
    )
    return endpoint, [get(endpoint, "/text").status_code for _ in range(4)]


def test_a_hung_replica_is_ejected_after_timeouts_and_comes_back_when_readmitted(
    silent: Silent, upstream: Upstream
) -> None:
    endpoint, before = with_a_hung_replica(silent, upstream)
    try:
        ejected = endpoint.ejected()
        while_out = [get(endpoint, "/text").status_code for _ in range(4)]
        reached_while_out = len(silent.requests)
        endpoint.readmit("hung")
        wait_until(lambda: not endpoint.ejected(), timeout=WAIT, what="the readmission")
        for _ in range(2):  # in turn: one of them, at least, goes to the hung replica
            with contextlib.suppress(requests.Timeout):
                requests.get(endpoint.url + "/text", timeout=0.5)
        wait_until(lambda: len(silent.requests) > 2, timeout=WAIT, what="a request to reach it again")
    finally:
        endpoint.close()

    assert sorted(before) == [200, 200, 504, 504]
    assert ejected == {"hung"}
    assert while_out == [200] * 4
    assert reached_while_out == 2


def test_the_last_replica_in_rotation_is_never_ejected(dead: int) -> None:
    endpoint = endpoint_with(EndpointLimits(eject_after_failures=2), dead=dead)
    try:
        answers = [get(endpoint, "/text").status_code for _ in range(4)]
        ejected = endpoint.ejected()
    finally:
        endpoint.close()

    assert answers == [503] * 4
    assert ejected == set()


def test_an_ejected_replica_stays_out_of_a_new_table_until_it_leaves_the_table(
    silent: Silent, upstream: Upstream
) -> None:
    endpoint, _ = with_a_hung_replica(silent, upstream)
    try:
        wait_until(lambda: endpoint.ejected() == {"hung"}, timeout=WAIT, what="the ejection")
        endpoint.set_upstreams({"hung": silent.port, "ok": upstream.port})
        answers = [get(endpoint, "/text").status_code for _ in range(4)]
        still_ejected = endpoint.ejected()
        endpoint.set_upstreams({"ok": upstream.port})
        forgotten = wait_until(lambda: endpoint.ejected() == set(), timeout=WAIT, what="no ejection")
    finally:
        endpoint.close()

    assert answers == [200] * 4
    assert still_ejected == {"hung"}
    assert len(silent.requests) == 2  # the two that timed out before the ejection
    assert forgotten


def test_new_requests_go_where_fewer_are_in_flight(silent: Silent, upstream: Upstream) -> None:
    endpoint = endpoint_with(EndpointLimits(), hung=silent.port)
    hanging = socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT)
    try:
        hanging.sendall(b"GET /hangs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        wait_until(lambda: silent.requests, timeout=WAIT, what="a request to hang on the replica")
        endpoint.set_upstreams({"hung": silent.port, "ok": upstream.port})
        answers = [get(endpoint, f"/text?{i}").status_code for i in range(6)]
    finally:
        hanging.close()
        endpoint.close()

    assert answers == [200] * 6, "a request went to the replica that has one hanging"
    assert len(silent.requests) == 1
