"""What the endpoint sends a replica for a client's request, and which headers it returns.

Hop-by-hop headers (RFC 9110 section 7.6.1) mean something for one connection only: they are
dropped both ways, together with any header that a `Connection` header names. The request
head is built once, as bytes, and written to the replica's connection as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from dstackctl.upstream_pool import UPSTREAM_HOST, UpstreamConnection

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Not passed on as the client sent them either: the replica gets its own Host, the endpoint
# answers `Expect: 100-continue` itself, and the forwarding headers are the endpoint's to set
# (a client's own X-Forwarded-For or X-Real-IP would let it pose as another address).
_SET_HERE = (b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip", b"forwarded")
_NOT_FORWARDED = frozenset(name.encode() for name in HOP_BY_HOP) | {b"host", b"expect", *_SET_HERE}
# Methods a reverse proxy does not pass on: CONNECT asks for a tunnel, and TRACE would echo the
# client's headers (its cookies, say) back from the replica.
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
# A client may leave Content-Length out of an empty POST; some servers then answer 411.
_METHODS_WITH_LENGTH = frozenset({"POST", "PUT", "PATCH"})
# A streamed request body is kept in memory up to this size, so the request can be sent
# again when the pooled connection it went out on turns out to be closed by the replica.
REPLAY_LIMIT_BYTES = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# As dstack's gateway (nginx) does for WebSockets: Upgrade and Connection go on to the replica.
_WEBSOCKET_UPGRADE = b"Upgrade: websocket\r\nConnection: upgrade\r\n"
_HOST = UPSTREAM_HOST.encode()


class OutgoingRequest:
    """A client's request as the replicas get it.

    Its body is either in memory (`body`: it had fully arrived with the head, so it can be
    sent again at no cost) or streamed from the client as it arrives (`stream`).
    """

    __slots__ = ("_head", "body", "expects_continue", "head_only", "resendable", "stream", "upgrade")

    def __init__(self, request: web.BaseRequest) -> None:
        self.head_only = request.method == "HEAD"
        self.body, self.stream, framing = _body_of(request)
        self.expects_continue = (
            self.stream is not None and request.headers.get("Expect", "").lower() == "100-continue"
        )
        options = connection_options(request.headers)
        self.upgrade = "upgrade" in options and request.headers.get("Upgrade", "").lower() == "websocket"
        # Safe to send to a second replica when the first one hangs: it changes nothing there.
        self.resendable = request.method in _SAFE_METHODS and not self.upgrade and not self.has_body
        self._head = b"".join(
            (
                b"%s %s HTTP/1.1\r\n" % (request.method.encode(), _origin_form(request.raw_path)),
                forwarded_headers(request.raw_headers, options, request.remote),
                framing,
                _WEBSOCKET_UPGRADE if self.upgrade else b"",
            )
        )

    @property
    def has_body(self) -> bool:
        return bool(self.body) or self.stream is not None

    @property
    def replayable(self) -> bool:
        """True while every byte sent so far can be sent again."""
        return self.stream is None or self.stream.replayable

    def send(self, connection: UpstreamConnection) -> asyncio.Task[None] | None:
        """Write the request to `connection`; a streamed body goes on in the task returned."""
        connection.write(b"%sHost: %s:%d\r\n\r\n%s" % (self._head, _HOST, connection.port, self.body))
        if self.stream is None:
            return None
        upload = asyncio.create_task(self.stream.send(connection))
        upload.add_done_callback(lambda task: _close_when_failed(task, connection))
        return upload


def _origin_form(target: str) -> bytes:
    """The request target as a replica expects it: an absolute-form target
    (`http://host/path?q`, which a client may send to a proxy) becomes `/path?q`."""
    if not target.startswith("/") and "://" in target:
        rest = target.split("://", 1)[1]
        slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=-1)
        target = "/" if slash < 0 else rest[slash:]
        target = target if target.startswith("/") else "/" + target
    return target.encode("utf-8", "surrogateescape")


def _body_of(request: web.BaseRequest) -> tuple[bytes, StreamedBody | None, bytes]:
    """The request body, in memory or to stream, and the header that frames it for the replica."""
    chunked = request.content_length is None
    if not request.body_exists:
        needs_length = chunked and request.method in _METHODS_WITH_LENGTH
        return b"", None, b"Content-Length: 0\r\n" if needs_length else b""
    if request.content.is_eof():  # it all came with the head
        body = request.content.read_nowait()
        return body, None, b"Content-Length: %d\r\n" % len(body) if chunked else b""
    return b"", StreamedBody(request.content, chunked), b"Transfer-Encoding: chunked\r\n" if chunked else b""


def _close_when_failed(upload: asyncio.Task[None], connection: UpstreamConnection) -> None:
    # A body that cannot be sent whole (the client left, the replica closed) leaves the
    # replica waiting for the rest: closing the connection ends its wait, and the request.
    if not upload.cancelled() and upload.exception() is not None:
        connection.close()


class StreamedBody:
    """A request body read from the client while it is written to a replica.

    What was read stays in memory up to REPLAY_LIMIT_BYTES, so that the body can be written
    again, from the start, on another connection.
    """

    __slots__ = ("_chunked", "_content", "_kept", "_kept_size")

    def __init__(self, content: StreamReader, chunked: bool) -> None:
        self._content = content
        self._chunked = chunked
        self._kept: list[bytes] | None = []
        self._kept_size = 0

    @property
    def replayable(self) -> bool:
        return self._kept is not None

    async def send(self, connection: UpstreamConnection) -> None:
        for chunk in self._kept or ():
            connection.write(self._framed(chunk))
        while chunk := await self._content.readany():
            self._keep(chunk)
            connection.write(self._framed(chunk))
            await connection.drain()
        if self._chunked:
            connection.write(b"0\r\n\r\n")

    def _keep(self, chunk: bytes) -> None:
        if self._kept is None:
            return
        self._kept_size += len(chunk)
        if self._kept_size > REPLAY_LIMIT_BYTES:
            self._kept = None
        else:
            self._kept.append(chunk)

    def _framed(self, chunk: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(chunk), chunk) if self._chunked else chunk


def forwarded_headers(
    raw_headers: Iterable[tuple[bytes, bytes]], connection: frozenset[str], peer: str | None
) -> bytes:
    """The client's headers for the replica, as header lines, with the forwarding headers the
    endpoint sets: X-Forwarded-For and X-Real-IP (the client's address, replacing what the
    client sent: the endpoint is the first proxy), X-Forwarded-Host (the Host the client
    asked for) and X-Forwarded-Proto.

    `connection` holds the names the client's Connection header lists (connection_options).
    """
    dropped = (
        _NOT_FORWARDED.union(name.encode("latin-1") for name in connection) if connection else _NOT_FORWARDED
    )
    lines: list[bytes] = []
    host = b""
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered == b"host":
            host = value
        if lowered not in dropped:
            lines.append(b"%s: %s\r\n" % (name, value))
    address = (peer or "").encode()
    lines.append(b"X-Forwarded-For: %s\r\nX-Real-IP: %s\r\n" % (address, address))
    if host:
        lines.append(b"X-Forwarded-Host: %s\r\n" % host)
    lines.append(b"X-Forwarded-Proto: http\r\n")
    return b"".join(lines)


def drop_hop_by_hop(headers: CIMultiDict[str]) -> None:
    """Remove the replica's hop-by-hop headers from the response headers for the client."""
    for name in HOP_BY_HOP | connection_options(headers):
        headers.popall(name, None)


def connection_options(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> frozenset[str]:
    """The header names the Connection headers list (`Connection: close, X-Foo` -> x-foo)."""
    if "Connection" not in headers:
        return frozenset()
    tokens = (token.strip().lower() for value in headers.getall("Connection") for token in value.split(","))
    return frozenset(token for token in tokens if token)
