"""The endpoint's timeouts: a replica that stops answering, a client that leaves, a client that
stops halfway through a request head or stays idle."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests
from helpers import free_port, wait_until
from test_proxy_pool import WAIT, Upstream, get, no_startup_grace, upstream

from dstackctl.endpoint_limits import EndpointLimits
from dstackctl.proxy import Endpoint

__all__ = ["no_startup_grace", "upstream"]  # fixtures, used here too


@dataclass
class Silent(Upstream):
    """A replica that hangs: it accepts connections and reads requests, and never answers."""

    requests: list[bytes] = field(default_factory=list)  # what it read, as it arrived

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            while data := conn.recv(65536):  # until the endpoint closes its side
                self.requests.append(data)
        with self._lock:
            self.open -= 1


@pytest.fixture
def silent() -> Iterator[Silent]:
    server = Silent()
    yield server
    server.close()


def endpoint_with(limits: EndpointLimits, **upstreams: int) -> Endpoint:
    endpoint = Endpoint("svc", free_port(), limits=limits)
    endpoint.start()
    endpoint.set_upstreams(upstreams)
    return endpoint


def closed_by_peer(client: socket.socket) -> bool:
    try:
        return client.recv(65536) == b""
    except ConnectionResetError:
        return True


# --- the replica's side ----------------------------------------------------------------------


def test_a_replica_that_sends_nothing_for_the_read_timeout_gets_a_504_json(silent: Silent) -> None:
    endpoint = endpoint_with(EndpointLimits(read_timeout=1), hung=silent.port)
    try:
        answer = requests.get(endpoint.url + "/slow", timeout=WAIT * 2)
    finally:
        endpoint.close()

    assert answer.status_code == 504
    assert answer.json() == {"error": "the replica sent no answer for 1s", "read_timeout_seconds": 1}
    wait_until(lambda: silent.open == 0, timeout=WAIT, what="the hung replica's connection to be closed")


def test_a_stream_lives_while_bytes_keep_coming(upstream: Upstream) -> None:
    endpoint = endpoint_with(EndpointLimits(read_timeout=2), r0=upstream.port)
    try:
        # 8 chunks 0.4 s apart: 2.8 s in all, more than the read timeout, never 2 s silent
        answer = get(endpoint, "/chunks?n=8&gap=0.4")
    finally:
        endpoint.close()

    assert [line.split(" at ")[0] for line in answer.text.splitlines()] == [f"chunk {i}" for i in range(8)]


def test_a_stream_that_falls_silent_mid_body_is_closed(upstream: Upstream) -> None:
    endpoint = endpoint_with(EndpointLimits(read_timeout=1), r0=upstream.port)
    connection = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=WAIT * 2)
    try:
        connection.request("GET", "/chunks?n=2&gap=6")  # the second chunk comes after 6 s
        response = connection.getresponse()
        first = response.readline()
        with pytest.raises(http.client.IncompleteRead) as cut:
            response.read()
    finally:
        connection.close()
        endpoint.close()

    assert first.startswith(b"chunk 0")
    assert b"chunk 1" not in cut.value.partial


# --- the client's side -----------------------------------------------------------------------


def test_a_client_that_leaves_cancels_its_request_and_it_goes_nowhere_else(
    silent: Silent, upstream: Upstream
) -> None:
    endpoint = endpoint_with(EndpointLimits(), hung=silent.port)
    try:
        client = socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT)
        client.sendall(b"GET /forever HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        wait_until(lambda: silent.requests, timeout=WAIT, what="the request to reach the hung replica")
        endpoint.set_upstreams({"hung": silent.port, "other": upstream.port})
        client.close()

        wait_until(lambda: silent.open == 0, timeout=WAIT, what="the replica's connection to be closed")
        wait_until(lambda: endpoint.inflight("hung") == 0, timeout=WAIT, what="the in-flight count to drop")
        drained = endpoint.drain("hung", timeout=1)
        other_inflight = endpoint.inflight("other")
    finally:
        endpoint.close()

    assert drained
    assert (upstream.seen, other_inflight) == ([], 0), "the abandoned request was sent to another replica"
    assert len(silent.requests) == 1


def test_a_request_head_that_stops_halfway_is_closed_after_the_header_timeout(upstream: Upstream) -> None:
    endpoint = endpoint_with(EndpointLimits(header_timeout=1), r0=upstream.port)
    clients = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT) for _ in range(3)]
    try:
        for client in clients:
            client.sendall(b"GET /text HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half")
        closed = [closed_by_peer(client) for client in clients]  # each waits up to WAIT
        answer = get(endpoint, "/text")
    finally:
        for client in clients:
            client.close()
        endpoint.close()

    assert closed == [True, True, True]
    assert answer.status_code == 200
    assert upstream.seen[-1].path == "/text" and len(upstream.seen) == 1


def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(upstream: Upstream) -> None:
    endpoint = endpoint_with(EndpointLimits(keepalive_timeout=1), r0=upstream.port)
    client = socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT)
    try:
        client.sendall(b"GET /text HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = client.recv(65536)
        closed = closed_by_peer(client)  # waits up to WAIT
    finally:
        client.close()
        endpoint.close()

    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert closed
