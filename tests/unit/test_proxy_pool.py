"""The endpoint's keep-alive pool and forwarding, against real HTTP servers on 127.0.0.1.

`Upstream` is a small threaded HTTP/1.1 server whose answers are chosen by path; it records
every request it read and counts its connections, so the tests see what the replica saw.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from helpers import free_port, wait_until

from dstackctl import proxy
from dstackctl.proxy import Endpoint
from dstackctl.upstream_pool import UpstreamPool

WAIT = 5.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    connection: int  # 1 for the first connection the server accepted, and so on
    framing: str  # "length", "chunked" or "none"
    first_body_at: float | None = None  # time.monotonic() when the first body bytes arrived


@dataclass
class Upstream:
    """A replica: answers by path, closes kept-alive connections when asked to.

    drop_reused: read the second request of a connection, then close it without answering
    (a replica that closed an idle keep-alive connection just as it was reused).
    idle_close_after: close a connection that stayed idle this many seconds.
    """

    drop_reused: bool = False
    idle_close_after: float | None = None
    seen: list[Seen] = field(default_factory=list)
    # requests read on a connection after an answer that said it would close
    after_close: list[Seen] = field(default_factory=list)
    accepted: int = 0
    open: int = 0

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.open += 1
                number = self.accepted
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(self.idle_close_after or 30)
        reader = conn.makefile("rb")
        try:
            served = 0
            while (request := _read_request(reader, number)) is not None:
                if self.drop_reused and served:
                    break
                served += 1
                self.seen.append(request)
                then = _answer(conn, request)
                if then == "linger":  # a well-behaved client sends nothing more here
                    conn.settimeout(0.3)
                    if (late := _read_request(reader, number)) is not None:
                        self.after_close.append(late)
                if then != "keep":
                    break
        except OSError:
            pass
        finally:
            reader.close()
            conn.close()
            with self._lock:
                self.open -= 1


def _read_request(reader: BinaryIO, number: int) -> Seen | None:
    line = reader.readline()
    if not line.strip():
        return None
    method, target, _version = line.decode().split()
    headers: dict[str, str] = {}
    while (header := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, value = header.decode().split(":", 1)
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    seen = Seen(method, target, headers, b"", number, "none")
    if "content-length" in headers:
        seen.framing = "length"
        seen.body = reader.read(int(headers["content-length"]))
        seen.first_body_at = time.monotonic()
    elif headers.get("transfer-encoding") == "chunked":
        seen.framing = "chunked"
        seen.body = _read_chunked(reader, seen)
    return seen


def _read_chunked(reader: BinaryIO, seen: Seen) -> bytes:
    parts = []
    while size := int(reader.readline().split(b";")[0], 16):
        parts.append(reader.read(size))
        seen.first_body_at = seen.first_body_at or time.monotonic()
        reader.readline()
    while reader.readline() not in (b"\r\n", b"\n", b""):  # trailer
        pass
    return b"".join(parts)


def _answer(conn: socket.socket, request: Seen) -> str:
    """Send the answer that the request's path asks for; say what becomes of the connection:
    "keep" it, "close" it (the end of the body), or "linger" (it said it would close)."""
    url = urlsplit(request.path)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    text = f"{url.path} on connection {request.connection}".encode()
    if request.method == "HEAD":
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Head: yes\r\n\r\n")
    elif url.path == "/no-content":
        conn.sendall(b"HTTP/1.1 204 No Content\r\nX-Empty: yes\r\n\r\n")
    elif url.path == "/chunks":
        _send_chunks(conn, int(query["n"]), float(query["gap"]))
    elif url.path == "/big":
        _send_in_pieces(conn, int(query["size"]))
    elif url.path == "/until-close":
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + text)
        return "close"
    elif url.path == "/close":
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)
        )
        return "linger"
    elif url.path == "/http10":
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
        return "linger"
    elif url.path == "/hop":
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=5\r\n"
            b"X-Public: yes\r\nContent-Length: 2\r\n\r\nok"
        )
    else:
        time.sleep(float(query.get("sleep", 0)))
        body = request.body if url.path == "/echo" else text
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return "keep"


def _send_chunks(conn: socket.socket, count: int, gap: float) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(count):
        if i:
            time.sleep(gap)
        data = f"chunk {i} at {time.monotonic():.6f}\n".encode()
        conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
    conn.sendall(b"0\r\n\r\n")


def _send_in_pieces(conn: socket.socket, size: int) -> None:
    body = bytes(i % 251 for i in range(size))
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    for start in range(0, size, 65536):
        conn.sendall(body[start : start + 65536])
        time.sleep(0.005)


def big_body(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_startup_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "STARTUP_GRACE_SECONDS", 0.0)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


def serving(*upstreams: Upstream) -> Endpoint:
    endpoint = Endpoint("svc", free_port())
    endpoint.start()
    endpoint.set_upstreams({f"r{i}": u.port for i, u in enumerate(upstreams)})
    return endpoint


@pytest.fixture
def endpoint(upstream: Upstream) -> Iterator[Endpoint]:
    served = serving(upstream)
    yield served
    served.close()


def get(endpoint: Endpoint, path: str, **kwargs: object) -> requests.Response:
    return requests.get(endpoint.url + path, timeout=WAIT, **kwargs)  # type: ignore[arg-type]


# --- keep-alive ---------------------------------------------------------------------------


def test_sequential_requests_reuse_one_connection_to_the_replica(
    upstream: Upstream, endpoint: Endpoint
) -> None:
    bodies = [get(endpoint, f"/text?{i}").text for i in range(5)]

    assert bodies == ["/text on connection 1"] * 5
    assert upstream.accepted == 1


@pytest.mark.parametrize("kind", ["get", "post in memory", "post streamed"])
def test_a_request_on_a_pooled_connection_the_replica_dropped_goes_again_on_a_new_one(kind: str) -> None:
    upstream = Upstream(drop_reused=True)
    endpoint = serving(upstream)
    try:
        answers = [send_kind(endpoint, kind, i) for i in range(3)]
    finally:
        endpoint.close()
        upstream.close()

    assert [a.status_code for a in answers] == [200, 200, 200]
    if kind == "get":
        assert [a.text for a in answers] == [f"/text on connection {n}" for n in (1, 2, 3)]
    else:
        assert [a.text for a in answers] == [f"body {i} " * 100 for i in range(3)]
    assert upstream.accepted == 3  # each reuse met a dropped connection, then a new one


def send_kind(endpoint: Endpoint, kind: str, i: int) -> requests.Response:
    body = f"body {i} " * 100
    if kind == "get":
        return get(endpoint, "/text")
    if kind == "post in memory":
        return requests.post(endpoint.url + "/echo", data=body.encode(), timeout=WAIT)

    def slowly() -> Iterator[bytes]:
        for part in (body[:300], body[300:]):
            yield part.encode()
            time.sleep(0.1)

    return requests.post(endpoint.url + "/echo", data=slowly(), timeout=WAIT)


def test_an_idle_connection_the_replica_closed_is_not_used_again() -> None:
    upstream = Upstream(idle_close_after=0.2)
    endpoint = serving(upstream)
    try:
        first = get(endpoint, "/text")
        wait_until(lambda: upstream.open == 0, timeout=WAIT, what="the replica to close the idle connection")
        second = get(endpoint, "/text")
    finally:
        endpoint.close()
        upstream.close()

    assert (first.text, second.text) == ("/text on connection 1", "/text on connection 2")


def test_answers_with_connection_close_or_from_http_1_0_are_not_pooled(
    upstream: Upstream, endpoint: Endpoint
) -> None:
    texts = [get(endpoint, path).text for path in ("/close", "/close", "/http10", "/http10", "/text")]

    assert texts == [f"{p} on connection {n}" for n, p in enumerate(["/close"] * 2 + ["/http10"] * 2, 1)] + [
        "/text on connection 5"
    ]
    assert upstream.after_close == []


def test_the_pool_keeps_at_most_its_cap_and_closes_idle_connections_after_the_timeout(
    upstream: Upstream,
) -> None:
    async def scenario() -> tuple[int, int]:
        pool = UpstreamPool(asyncio.get_running_loop(), idle_timeout=0.3, max_idle_per_replica=2)
        pool.route_to([upstream.port])
        connections = [await pool.connect(upstream.port) for _ in range(3)]
        for connection in connections:
            pool.release(connection, reusable=True)
        kept = pool.idle_count(upstream.port)
        # the idle timeout closes them; poll, with a deadline far past the 0.3 s
        deadline = time.monotonic() + WAIT
        while (left := pool.idle_count(upstream.port)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        pool.close()
        return kept, left

    kept, left = asyncio.run(scenario())

    assert (kept, left) == (2, 0)
    wait_until(lambda: upstream.open == 0, timeout=WAIT, what="the replica to see every connection closed")


# --- bodies ---------------------------------------------------------------------------------


def test_a_chunked_answer_reaches_the_client_chunk_by_chunk(upstream: Upstream, endpoint: Endpoint) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=WAIT)
    try:
        connection.request("GET", "/chunks?n=3&gap=0.4")
        response = connection.getresponse()
        first = response.readline().decode()
        first_received = time.monotonic()
        rest = response.read().decode().splitlines()
    finally:
        connection.close()

    lines = [first.rstrip("\n"), *rest]
    assert [line.split(" at ")[0] for line in lines] == ["chunk 0", "chunk 1", "chunk 2"]
    last_produced = float(lines[-1].split(" at ")[1])
    # an order, not a window: the replica made the last chunk 0.8 s after the first, and only
    # a proxy that buffers the answer delivers the first one after that
    assert first_received < last_produced, "the first chunk waited for the last"


@pytest.mark.parametrize("path", ["/text", "/big?size=3000000", "/until-close"])
def test_bodies_delimited_by_length_or_by_close_arrive_whole(
    upstream: Upstream, endpoint: Endpoint, path: str
) -> None:
    answer = get(endpoint, path)

    assert answer.status_code == 200
    expected = big_body(3000000) if path.startswith("/big") else f"{path} on connection 1".encode()
    assert answer.content == expected
    if path == "/until-close":
        assert get(endpoint, "/text").text == "/text on connection 2"  # read until close: not pooled
    else:
        assert get(endpoint, "/text").text == "/text on connection 1"


def test_head_and_204_answers_have_no_body_and_keep_the_connection(
    upstream: Upstream, endpoint: Endpoint
) -> None:
    head = requests.head(endpoint.url + "/text", timeout=WAIT)
    empty = get(endpoint, "/no-content")
    after = get(endpoint, "/text")

    assert (head.status_code, head.headers["Content-Length"], head.headers["X-Head"], head.content) == (
        200,
        "5",
        "yes",
        b"",
    )
    assert (empty.status_code, empty.headers["X-Empty"], empty.content) == (204, "yes", b"")
    assert after.text == "/text on connection 1"


def test_a_chunked_request_body_streams_to_the_replica(upstream: Upstream, endpoint: Endpoint) -> None:
    last_sent: list[float] = []

    def slowly() -> Iterator[bytes]:
        yield b"first part;"
        time.sleep(0.5)
        last_sent.append(time.monotonic())
        yield b"second part"

    answer = requests.post(endpoint.url + "/echo", data=slowly(), timeout=WAIT)

    assert (answer.status_code, answer.text) == (200, "first part;second part")
    seen = upstream.seen[-1]
    assert seen.framing == "chunked"
    assert seen.first_body_at is not None and seen.first_body_at < last_sent[0], "the body was buffered"


def test_a_large_request_body_with_a_length_arrives_whole(upstream: Upstream, endpoint: Endpoint) -> None:
    body = big_body(2_000_000)

    answer = requests.put(endpoint.url + "/echo", data=body, timeout=WAIT)

    assert answer.content == body
    assert (upstream.seen[-1].framing, upstream.seen[-1].headers["content-length"]) == ("length", "2000000")


def test_expect_100_continue_is_answered_by_the_endpoint(upstream: Upstream, endpoint: Endpoint) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT) as client:
        client.sendall(
            b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = client.recv(100)
        client.sendall(b"hello")
        final = receive_until(client, b"hello")

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert "expect" not in upstream.seen[-1].headers


def test_an_http_1_0_client_gets_a_stream_delimited_by_close(upstream: Upstream, endpoint: Endpoint) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT) as client:
        client.sendall(b"GET /chunks?n=2&gap=0.1 HTTP/1.0\r\n\r\n")
        answer = receive_until(client, b"")

    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200 OK\r\n"), head
    assert b"transfer-encoding" not in head.lower()
    assert [line.split(b" at ")[0] for line in body.splitlines()] == [b"chunk 0", b"chunk 1"]


def receive_until(client: socket.socket, ending: bytes) -> bytes:
    data = b""
    while not (ending and data.endswith(ending)):
        more = client.recv(65536)
        if not more:
            break
        data += more
    return data


# --- headers --------------------------------------------------------------------------------


def test_hop_by_hop_headers_are_dropped_both_ways_and_the_forwarding_headers_are_the_endpoints(
    upstream: Upstream, endpoint: Endpoint
) -> None:
    spoofed = {"X-Forwarded-For": "10.0.0.1", "X-Real-IP": "10.0.0.2", "X-Forwarded-Proto": "https"}
    answer = get(
        endpoint,
        "/hop",
        headers={
            "Connection": "X-Secret",
            "X-Secret": "1",
            "X-Kept": "2",
            "Host": "svc.localhost",
            **spoofed,
        },
    )

    seen = upstream.seen[-1].headers
    assert "x-secret" not in seen and "connection" not in seen
    assert (seen["x-kept"], seen["host"]) == ("2", f"127.0.0.1:{upstream.port}")
    # The client's address replaces what it claimed: the endpoint is the first proxy.
    assert (seen["x-forwarded-for"], seen["x-real-ip"]) == ("127.0.0.1", "127.0.0.1")
    assert (seen["x-forwarded-host"], seen["x-forwarded-proto"]) == ("svc.localhost", "http")
    assert answer.headers["X-Public"] == "yes"
    assert "X-Internal" not in answer.headers and "Keep-Alive" not in answer.headers


# --- rotation, retries, drain ---------------------------------------------------------------


def test_a_replica_that_refuses_connections_is_skipped(upstream: Upstream) -> None:
    dead = Upstream()
    dead.close()
    endpoint = serving(dead, upstream)
    try:
        answers = [get(endpoint, "/text") for _ in range(4)]
    finally:
        endpoint.close()

    assert [a.status_code for a in answers] == [200] * 4


def test_without_a_ready_replica_the_answer_is_503_json() -> None:
    endpoint = serving()
    try:
        answer = get(endpoint, "/text")
    finally:
        endpoint.close()

    assert (answer.status_code, answer.headers["Retry-After"]) == (503, "1")
    assert answer.json() == {"error": "no replica is ready", "service": "svc"}


@pytest.mark.parametrize("removal", ["set_upstreams", "drain"])
def test_idle_connections_to_a_replica_that_left_the_rotation_are_closed(
    upstream: Upstream, endpoint: Endpoint, removal: str
) -> None:
    assert get(endpoint, "/text").status_code == 200
    assert upstream.open == 1

    if removal == "drain":
        assert endpoint.drain("r0", timeout=1)
    else:
        endpoint.set_upstreams({})

    wait_until(lambda: upstream.open == 0, timeout=WAIT, what="the pooled connection to be closed")


def test_drain_waits_for_in_flight_requests(upstream: Upstream, endpoint: Endpoint) -> None:
    answers: list[requests.Response] = []
    client = threading.Thread(target=lambda: answers.append(get(endpoint, "/text?sleep=1")))
    client.start()
    wait_until(lambda: upstream.seen, timeout=WAIT, what="the slow request to reach the replica")

    assert endpoint.inflight("r0") == 1
    drained = endpoint.drain("r0", timeout=5)
    left = endpoint.inflight("r0")  # the replica answers 1 s after it read the request
    client.join(WAIT)

    assert drained
    assert left == 0, "drain returned while the request was still in flight"
    assert [a.status_code for a in answers] == [200]
    assert get(endpoint, "/text").status_code == 503
    wait_until(lambda: upstream.open == 0, timeout=WAIT, what="the drained connection to be closed")


def test_drain_gives_up_after_its_timeout(upstream: Upstream, endpoint: Endpoint) -> None:
    client = threading.Thread(target=lambda: get(endpoint, "/text?sleep=1"))
    client.start()
    wait_until(lambda: upstream.seen, timeout=WAIT, what="the slow request to reach the replica")

    assert endpoint.drain("r0", timeout=0.1) is False
    client.join(WAIT)


def test_a_client_leaving_mid_stream_closes_both_sides_without_an_error_logged(
    upstream: Upstream, endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    connection = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=WAIT)
    connection.request("GET", "/chunks?n=5&gap=0.2")
    assert connection.getresponse().readline().startswith(b"chunk 0")
    connection.close()

    wait_until(lambda: upstream.open == 0, timeout=WAIT, what="the replica's connection to be closed")
    assert get(endpoint, "/text").text == "/text on connection 2"
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
def test_connect_and_trace_are_refused_and_never_reach_a_replica(
    method: str, upstream: Upstream, endpoint: Endpoint
) -> None:
    target = "example.com:443" if method == "CONNECT" else "/text"
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT) as client:
        client.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nCookie: session=s3cret\r\n\r\n".encode())
        answer = client.recv(65536)

    assert answer.startswith(b"HTTP/1.1 405 "), answer
    assert b"Allow: " in answer and b"s3cret" not in answer
    assert upstream.seen == []


def test_an_absolute_form_target_reaches_the_replica_in_origin_form(
    upstream: Upstream, endpoint: Endpoint
) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT) as client:
        client.sendall(
            b"GET http://svc.localhost/text?x=1 HTTP/1.1\r\nHost: svc.localhost\r\nConnection: close\r\n\r\n"
        )
        answer = receive_until(client, b"")

    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert upstream.seen[-1].path == "/text?x=1"
