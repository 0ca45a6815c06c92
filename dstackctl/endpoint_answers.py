"""The endpoint's own answers (503, 502, 504) and the test for an answer small enough to
pass on in one write."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

# An answer with a Content-Length up to this is read whole before it is passed on, so that
# head and body reach the client in one write; longer ones, and streams, are relayed as they come.
SMALL_BODY_BYTES = 64 * 1024


def is_small(headers: CIMultiDictProxy[str], payload: StreamReader) -> bool:
    """True when the whole body is here already, or has a length of at most SMALL_BODY_BYTES."""
    if payload.is_eof():
        return True
    length = headers.get("Content-Length")
    return length is not None and length.isdigit() and int(length) <= SMALL_BODY_BYTES


def broken_answer(error: BaseException) -> str:
    return f"the replica sent a broken answer ({type(error).__name__})"


def json_response(status: int, payload: dict[str, Any], retry_after: int = 1) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers={"Retry-After": str(retry_after)} if status == 503 else None,
    )


def unavailable(service: str, retried: bool) -> web.Response:
    reason = "no replica could be reached" if retried else "no replica is ready"
    return json_response(503, {"error": reason, "service": service})


def not_woken(service: str, waited: float) -> web.Response:
    """A request held while a service scaled to zero started a replica, for too long."""
    reason = f"no replica of {service} became ready within {waited:g}s of this request; one is starting"
    return json_response(503, {"error": reason, "service": service, "waited_seconds": waited}, 10)


def refused_method(method: str) -> web.Response:
    reason = f"{method} is not passed on to replicas (the endpoint is a reverse proxy, not a tunnel)"
    response = json_response(405, {"error": reason})
    response.headers["Allow"] = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    return response


def bad_gateway(reason: str) -> web.Response:
    return json_response(502, {"error": reason})


def gateway_timeout(read_timeout: float) -> web.Response:
    reason = f"the replica sent no answer for {read_timeout:g}s"
    return json_response(504, {"error": reason, "read_timeout_seconds": read_timeout})
