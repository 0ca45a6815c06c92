"""A WebSocket passed through the endpoint, as dstack's gateway (nginx) passes one.

The client's `Upgrade: websocket` goes on to the replica; when the replica answers 101, the
endpoint relays that answer and then pipes bytes both ways, unread, until either side closes
or no byte went either way for the idle timeout (nginx's proxy_read_timeout).

Both aiohttp protocols (the client's server-side one, the replica's client-side one) hand
the bytes they receive to a parser set with `set_parser`, the hook aiohttp's own WebSocket
reader uses; it also hands over what arrived before the switch.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import RawResponseMessage

from dstackctl.forwarding import drop_hop_by_hop
from dstackctl.upstream_pool import UpstreamConnection


class _Tunnel:
    """Ends when either side closes or after `idle_timeout` seconds without a byte."""

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float) -> None:
        self._loop = loop
        self._idle_timeout = idle_timeout
        self.ended: asyncio.Future[None] = loop.create_future()
        self.last_byte_at = loop.time()
        self._timer = loop.call_later(idle_timeout, self._check_idle)

    def touch(self) -> None:
        self.last_byte_at = self._loop.time()

    def end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def close(self) -> None:
        self._timer.cancel()
        self.end()

    def _check_idle(self) -> None:
        quiet_until = self.last_byte_at + self._idle_timeout
        if self._loop.time() >= quiet_until:
            self.end()
        else:
            self._timer = self._loop.call_at(quiet_until, self._check_idle)


class _Pipe:
    """What reaches `source`, written to `target`; `source` stops reading while `target`
    cannot take more (its peer reads slowly)."""

    def __init__(self, tunnel: _Tunnel, source: BaseProtocol, target: BaseProtocol) -> None:
        self._tunnel = tunnel
        self._source = source
        self._target = target
        self._holding: asyncio.Task[None] | None = None

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        transport = self._target.transport
        if transport is None or transport.is_closing():
            self._tunnel.end()
            return False, b""
        transport.write(data)
        self._tunnel.touch()
        if self._target.writing_paused and self._holding is None and self._source.transport is not None:
            self._source.transport.pause_reading()
            self._holding = asyncio.ensure_future(self._resume_when_drained())
        return False, b""

    def feed_eof(self) -> None:
        self._tunnel.end()

    def set_exception(self, *_: Any) -> None:
        self._tunnel.end()

    async def _resume_when_drained(self) -> None:
        try:
            await self._target._drain_helper()
        except ConnectionError:
            self._tunnel.end()
            return
        finally:
            self._holding = None
        if self._source.transport is not None:
            self._source.transport.resume_reading()


async def tunnel(
    request: web.BaseRequest, connection: UpstreamConnection, answer: RawResponseMessage, idle_timeout: float
) -> web.StreamResponse:
    """Relay the replica's 101 to the client, then pipe bytes both ways until the end."""
    response = web.StreamResponse(status=101, reason=answer.reason, headers=answer.headers)
    drop_hop_by_hop(response.headers)
    response.headers["Upgrade"] = answer.headers.get("Upgrade", "websocket")
    response.headers["Connection"] = "upgrade"
    client, upstream = request.protocol, connection.protocol
    upstream.read_timeout = None  # from here the tunnel's idle timer counts, both ways
    relay = _Tunnel(asyncio.get_running_loop(), idle_timeout)
    try:
        await response.prepare(request)
        to_client = _Pipe(relay, upstream, client)
        upstream.set_parser(to_client, to_client)
        client.set_parser(_Pipe(relay, client, upstream))  # type: ignore[arg-type]
        await relay.ended
    finally:
        relay.close()
        connection.close()
        if request.transport is not None:
            request.transport.close()
    return response
