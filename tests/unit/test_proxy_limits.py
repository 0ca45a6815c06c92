"""Limits on the endpoint's client connections: a flood of idle connections from one address,
or from several, leaves room for other clients and logs a line now and then, not per connection."""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Iterator

import pytest
from helpers import wait_until
from test_proxy_pool import WAIT, Upstream, get, no_startup_grace, upstream
from test_proxy_timeouts import endpoint_with

from dstackctl.endpoint_limits import EndpointLimits
from dstackctl.proxy import Endpoint

__all__ = ["no_startup_grace", "upstream"]  # fixtures, used here too


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for client in opened:
        client.close()


def connect_from(address: str, endpoint: Endpoint, count: int, into: list[socket.socket]) -> None:
    for _ in range(count):
        client = socket.socket()
        client.bind((address, 0))
        client.connect(("127.0.0.1", endpoint.port))
        into.append(client)


def closed_count(clients: list[socket.socket]) -> int:
    """How many of `clients` the endpoint closed (it sends them nothing else)."""
    readable, _, _ = select.select(clients, [], [], 0)
    closed = 0
    for client in readable:
        try:
            closed += client.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            closed += 1
    return closed


def limit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "limit" in r.getMessage()]


def test_a_flood_from_one_address_keeps_its_limit_and_others_are_served(
    upstream: Upstream, clients: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dstackctl.proxy")
    limits = EndpointLimits(max_connections_per_client=20, max_connections=100)
    endpoint = endpoint_with(limits, r0=upstream.port)
    try:
        connect_from("127.0.0.2", endpoint, 300, clients)
        wait_until(lambda: closed_count(clients) >= 280, timeout=WAIT * 2, what="280 of them to be closed")
        answers = [get(endpoint, "/text").status_code for _ in range(3)]  # from 127.0.0.1
        still_open = len(clients) - closed_count(clients)
    finally:
        endpoint.close()

    assert answers == [200, 200, 200]
    assert still_open == 20
    lines = limit_lines(caplog)
    assert 1 <= len(lines) <= 3, lines  # one line per 10 s, with a count, not one per connection
    assert "times since the last such line" in lines[0]


def test_at_the_total_limit_a_new_client_takes_the_place_of_the_oldest_idle_connection(
    upstream: Upstream, clients: list[socket.socket]
) -> None:
    limits = EndpointLimits(max_connections_per_client=30, max_connections=50)
    endpoint = endpoint_with(limits, r0=upstream.port)
    try:
        for last in range(2, 6):  # 4 addresses, 30 each: 120 connections, 50 allowed in all
            connect_from(f"127.0.0.{last}", endpoint, 30, clients)
        wait_until(lambda: closed_count(clients) >= 70, timeout=WAIT * 2, what="70 connections to be closed")
        answer = get(endpoint, "/text")
        wait_until(lambda: closed_count(clients) >= 71, timeout=WAIT, what="one more connection to be closed")
        closed_after = closed_count(clients)
    finally:
        endpoint.close()

    assert answer.status_code == 200
    assert closed_after == 71  # the oldest idle one gave its place to that request's connection
    assert all(closed_count([client]) for client in clients[:71]), "not the oldest ones were closed"
