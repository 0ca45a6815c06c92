"""Who may call an endpoint (issue 15 item 5): the Host check of every endpoint, against DNS
rebinding, and the bearer token of a service with `auth: true`; first as pure checks, then
through a real endpoint in front of a replica that records what it received."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator

import pytest
import requests
from helpers import free_port

from dstackctl import proxy
from dstackctl.agent.endpoint_host import EndpointHost
from dstackctl.agent.phases import ReplicaBook
from dstackctl.endpoint_guard import (
    EndpointGuard,
    allowed_host,
    bearer_token,
    host_name,
    target_authority,
    token_matches,
)
from dstackctl.proxy import Endpoint

WAIT = 5.0
TOKEN = "t0k3n-of-the-service"


# --- the pure checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:8000",
        "localhost.",
        "localhost:",
        "127.0.0.1",
        "127.0.0.1:31000",
        "127.1.2.3:80",
        "[::1]",
        "[::1]:8000",
        "svc.localhost",
        "a.b.localhost:9000",
        "10.1.2.3:8000",  # the endpoint's own address (below)
    ],
)
def test_loopback_names_and_the_endpoints_own_address_are_allowed(host: str) -> None:
    assert allowed_host([host], ["10.1.2.3"])


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8000",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "localhostx",
        "0.0.0.0:8000",  # a browser reaches this machine through it ("0.0.0.0 day")
        "10.9.9.9",
        "localhost:80:90",
        "localhost:abc",
        "localhost:\uff11\uff12",  # full-width digits
        "[::1",
        "[::1]x",
        ":8000",
    ],
)
def test_other_names_are_refused(host: str) -> None:
    assert not allowed_host([host], ["10.1.2.3"])


def test_no_host_or_an_empty_one_is_allowed_and_two_are_refused() -> None:
    assert allowed_host([], ["127.0.0.1"])  # HTTP/1.0
    assert allowed_host([""], ["127.0.0.1"])
    assert not allowed_host(["localhost", "localhost"], ["127.0.0.1"])


def test_host_name_drops_the_port_and_one_trailing_dot() -> None:
    assert host_name("Svc.LocalHost.:8000") == "svc.localhost"
    assert host_name("[::1]:80") == "[::1]"
    assert host_name("a b") == "a b"  # not a loopback name: refused by allowed_host
    assert host_name("localhost:x") is None


def test_an_absolute_form_target_names_its_authority() -> None:
    assert target_authority("/path?q=1") is None
    assert target_authority("http://evil.example:80/x") == "evil.example:80"
    assert target_authority("http://user@localhost?x") == "localhost"
    assert target_authority("http://[::1]:8000") == "[::1]:8000"


def test_bearer_token_reads_one_bearer_header_only() -> None:
    assert bearer_token(["Bearer abc"]) == "abc"
    assert bearer_token(["bearer   abc "]) == "abc"
    assert bearer_token(["Basic abc"]) is None
    assert bearer_token(["Bearer"]) is None
    assert bearer_token([]) is None
    assert bearer_token(["Bearer abc", "Bearer abc"]) is None


def test_token_matches_compares_the_whole_token() -> None:
    assert token_matches([f"Bearer {TOKEN}"], TOKEN)
    assert not token_matches([f"Bearer {TOKEN}x"], TOKEN)
    assert not token_matches([f"Bearer {TOKEN[:-1]}"], TOKEN)
    assert not token_matches(["Bearer t\u00f6ken\udcff"], TOKEN)  # non-ASCII: no TypeError


def test_an_agents_endpoint_refuses_everything_until_it_knows_about_auth() -> None:
    host = EndpointHost("svc", ReplicaBook(), grace_from=0.0)
    assert host.guard.requires_token
    host.protect(False, None)
    assert not host.guard.requires_token


# --- through a real endpoint ------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]]

    def do_GET(self) -> None:
        type(self).seen.append({name.lower(): value for name, value in self.headers.items()})
        body = b"replica says hi"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def no_startup_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "STARTUP_GRACE_SECONDS", 0.0)


@pytest.fixture
def replica() -> Iterator[type[_Recorder]]:
    handler = type("Recorder", (_Recorder,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handler.port = server.server_address[1]  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()


@pytest.fixture
def guard() -> EndpointGuard:
    return EndpointGuard("svc", "127.0.0.1")


@pytest.fixture
def endpoint(replica: type[_Recorder], guard: EndpointGuard) -> Iterator[Endpoint]:
    served = Endpoint("svc", free_port(), guard=guard)
    served.start()
    served.set_upstreams({"r0": replica.port})  # type: ignore[attr-defined]
    yield served
    served.close()


def get(endpoint: Endpoint, **headers: str) -> requests.Response:
    return requests.get(endpoint.url + "/x", headers=headers, timeout=WAIT)


def raw(endpoint: Endpoint, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT) as client:
        client.sendall(request)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer


def test_an_open_endpoint_refuses_a_foreign_host_with_421_and_counts_no_request(
    endpoint: Endpoint, replica: type[_Recorder]
) -> None:
    refused = get(endpoint, Host="evil.example")

    assert refused.status_code == 421
    assert refused.headers["Content-Type"].startswith("application/json")
    assert "DNS rebinding" in refused.json()["error"]
    assert replica.seen == []
    assert endpoint.rate.requests_in(30) == 0
    assert get(endpoint, Host=f"localhost:{endpoint.port}").status_code == 200
    assert get(endpoint, Host="svc.localhost").status_code == 200
    assert get(endpoint).status_code == 200  # requests sends Host: 127.0.0.1:PORT
    assert endpoint.rate.requests_in(30) == 3


def test_http_1_0_without_host_is_served_and_foreign_authorities_are_not(
    endpoint: Endpoint, replica: type[_Recorder]
) -> None:
    assert raw(endpoint, b"GET /x HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
    two_hosts = b"GET /x HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    assert raw(endpoint, two_hosts).split(b" ")[1] in (b"400", b"421")
    absolute = b"GET http://evil.example/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    assert raw(endpoint, absolute).startswith(b"HTTP/1.1 421")
    assert len(replica.seen) == 1


def test_an_open_endpoint_passes_the_clients_authorization_on(
    endpoint: Endpoint, replica: type[_Recorder]
) -> None:
    # Without `auth`, an app may check its own key (vLLM's --api-key): the header is its.
    assert get(endpoint, Authorization="Bearer app-key").status_code == 200
    assert replica.seen[-1]["authorization"] == "Bearer app-key"


def test_with_auth_a_request_without_the_token_gets_401_and_never_reaches_a_replica(
    endpoint: Endpoint, replica: type[_Recorder], guard: EndpointGuard
) -> None:
    guard.require(True, TOKEN)

    missing = get(endpoint)
    wrong = get(endpoint, Authorization="Bearer nope")
    basic = get(endpoint, Authorization=f"Basic {TOKEN}")

    assert [missing.status_code, wrong.status_code, basic.status_code] == [401, 401, 401]
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="svc"'
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="svc", error="invalid_token"'
    assert "`dstackctl token svc`" in missing.json()["error"]
    assert missing.json()["service"] == "svc"
    assert TOKEN not in missing.text + wrong.text
    assert replica.seen == []
    assert endpoint.rate.requests_in(30) == 0


def test_with_auth_the_right_token_is_served_and_not_passed_to_the_replica(
    endpoint: Endpoint, replica: type[_Recorder], guard: EndpointGuard
) -> None:
    guard.require(True, TOKEN)

    answer = get(endpoint, Authorization=f"Bearer {TOKEN}", **{"X-Kept": "yes"})

    assert answer.status_code == 200 and answer.text == "replica says hi"
    assert "authorization" not in replica.seen[-1]
    assert replica.seen[-1]["x-kept"] == "yes"
    assert endpoint.rate.requests_in(30) == 1


def test_the_host_check_comes_before_the_token(endpoint: Endpoint, guard: EndpointGuard) -> None:
    guard.require(True, TOKEN)
    answer = get(endpoint, Host="evil.example", Authorization=f"Bearer {TOKEN}")
    assert answer.status_code == 421


def test_auth_without_a_readable_token_refuses_every_request(
    endpoint: Endpoint, replica: type[_Recorder], guard: EndpointGuard
) -> None:
    guard.require(True, None)

    answer = get(endpoint, Authorization="Bearer anything")

    assert answer.status_code == 401
    assert "token file is missing" in json.loads(answer.text)["error"]
    assert replica.seen == []
