"""Who may call a service's endpoint.

Every endpoint refuses a request whose Host is not a loopback name or the endpoint's own
address: a web page whose name an attacker's DNS resolves to 127.0.0.1 (DNS rebinding) would
otherwise reach the replicas from the user's browser and read the answers. A service with
`auth: true` also needs `Authorization: Bearer TOKEN` (the token `dstackctl token NAME` prints);
that header is not passed on to the replicas. The checks are pure functions; `EndpointGuard`
holds the token the agent gives it and turns a refusal into the endpoint's answer.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # aiohttp is imported by the endpoint, not by the agent's start
    from aiohttp import web

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
_PORT = re.compile(r"(:[0-9]{0,5})?")
_SHOWN_HOST_CHARS = 64


def host_name(value: str) -> str | None:
    """The name part of a Host value (`localhost:8000` -> `localhost`), lower-case, without
    one trailing dot; None when it is not a name with an optional port."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]") + 1
        name, port = (value[:end], value[end:]) if end else ("", "")
    else:
        name, colon, rest = value.partition(":")
        port = colon + rest
    if not name or not _PORT.fullmatch(port):
        return None
    return name[:-1] if name.endswith(".") and len(name) > 1 else name


def is_loopback(name: str) -> bool:
    """`localhost`, a `*.localhost` name (RFC 6761: always this machine), or a loopback
    address (127.0.0.0/8, [::1])."""
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_host(values: Sequence[str], own_addresses: Iterable[str]) -> bool:
    """True when the request names this machine: no Host (HTTP/1.0), an empty one, or one Host
    that is a loopback name or one of `own_addresses`, with or without a port. Two Host
    headers are refused: a server and a proxy may read different ones."""
    if not values:
        return True
    if len(values) > 1:
        return False
    if not values[0].strip():
        return True
    name = host_name(values[0])
    if name is None:
        return False
    return is_loopback(name) or name.strip("[]") in {a.lower().strip("[]") for a in own_addresses}


def target_authority(raw_path: str) -> str | None:
    """The authority of an absolute-form target (`http://name:port/path`), which RFC 9112
    puts before the Host header; None for the usual origin-form (`/path`)."""
    if raw_path.startswith("/") or "://" not in raw_path:
        return None
    rest = raw_path.split("://", 1)[1]
    return re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]


def bearer_token(values: Sequence[str]) -> str | None:
    """The token of the one `Authorization: Bearer TOKEN` header; None when there is none,
    more than one, or another scheme."""
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def token_matches(values: Sequence[str], expected: str) -> bool:
    """The request's bearer token equals `expected`, compared in constant time."""
    presented = bearer_token(values)
    if presented is None:
        return False
    return hmac.compare_digest(
        presented.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


class EndpointGuard:
    """The checks of one endpoint, with the token the agent sets (`require`) from the
    service's token file; the agent's thread sets it, the endpoint's loop reads it."""

    def __init__(self, service: str, own_host: str, token_required: bool = False) -> None:
        self.service = service
        self._own_host = own_host
        # One tuple, replaced whole: the loop never sees a new flag with an old token.
        self._access: tuple[bool, str | None] = (token_required, None)

    def require(self, required: bool, token: str | None) -> None:
        """`required` without a token refuses every request (a lost token file fails closed)."""
        self._access = (required, token)

    @property
    def requires_token(self) -> bool:
        return self._access[0]

    def check(self, request: web.BaseRequest) -> web.BaseRequest | web.Response:
        """The request to pass on (without the Authorization header that carried the token),
        or the answer that refuses it."""
        own = [self._own_host]
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if sockname:
            own.append(str(sockname[0]))
        authority = target_authority(request.raw_path)
        hosts = request.headers.getall("Host", [])
        if not allowed_host(hosts, own) or (authority is not None and not allowed_host([authority], own)):
            return misdirected(self.service, authority or (hosts[0] if hosts else ""))
        required, token = self._access
        if not required:
            return request
        presented = request.headers.getall("Authorization", [])
        if token is None or not token_matches(presented, token):
            return unauthorized(self.service, bool(presented), token is None)
        headers = request.headers.copy()
        headers.popall("Authorization")
        try:
            return request.clone(headers=headers)
        except UnicodeEncodeError:  # aiohttp re-encodes the headers as UTF-8
            from dstackctl.endpoint_answers import json_response

            return json_response(400, {"error": "a request header is not valid UTF-8"})


def misdirected(service: str, host: str) -> web.Response:
    """421 (RFC 9110: this server does not serve that name), rather than 403: the request was
    not refused for who sent it but for the name it was sent to."""
    from dstackctl.endpoint_answers import json_response

    shown = host[:_SHOWN_HOST_CHARS]
    reason = (
        f"this endpoint answers to localhost, *.localhost and loopback addresses only, not to Host "
        f"{shown!r} (a web page under another name could reach it through DNS rebinding)"
    )
    return json_response(421, {"error": reason, "service": service})


def unauthorized(service: str, presented: bool, token_lost: bool) -> web.Response:
    """401 with `WWW-Authenticate: Bearer` (RFC 6750); `error="invalid_token"` for a wrong one."""
    from dstackctl.endpoint_answers import json_response

    if token_lost:
        reason = f"{service} has auth on but its token file is missing; `dstackctl token {service}` makes one"
    elif presented:
        reason = f"the bearer token is not {service}'s; `dstackctl token {service}` prints it"
    else:
        reason = (
            f"{service} needs the header `Authorization: Bearer TOKEN`; "
            f"`dstackctl token {service}` prints TOKEN"
        )
    challenge = f'Bearer realm="{service}"' + (', error="invalid_token"' if presented else "")
    response = json_response(401, {"error": reason, "service": service})
    response.headers["WWW-Authenticate"] = challenge
    return response
