"""The endpoint's side of its clients' connections: how many, and for how long.

Without bounds, clients that open connections and send nothing (or half a request head)
held the agent's descriptors until none was left for anyone. At a limit (per address, in
all) a new connection takes the place of the oldest one with no request in progress, as
nginx reuses its idle keep-alive connections; with none such, the new one is closed as it
is accepted. A request head must arrive whole within the header timeout
of its first byte; a connection with no request in progress closes after the keep-alive
timeout; a client that leaves cancels its request (aiohttp's handler_cancellation).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from aiohttp import web_server
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from dstackctl.endpoint_limits import EndpointLimits

log = logging.getLogger("dstackctl.proxy")

# A flood of refused connections is logged once per this many seconds, with a count.
LOG_EVERY_SECONDS = 10.0


class LimitedLog:
    """A warning logged at most once per `every` seconds, saying how many times it happened."""

    def __init__(self, message: str, every: float = LOG_EVERY_SECONDS) -> None:
        self._message = message
        self._every = every
        self._next_at = 0.0
        self._count = 0

    def note(self, *args: object) -> None:
        self._count += 1
        now = time.monotonic()
        if now < self._next_at:
            return
        log.warning(self._message + " (%d times since the last such line)", *args, self._count)
        self._count = 0
        self._next_at = now + self._every


class ClientConnection(RequestHandler):
    """aiohttp's connection handler, with a timeout on a request head that stops halfway."""

    def __init__(self, manager: ClientServer, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._on_slow_head = manager.slow_heads.note

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and not self._in_request and data:
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_too_slow)
        super().data_received(data)

    @property
    def idle(self) -> bool:
        """No request in progress: waiting for one, or for the rest of its head."""
        return not self._in_request

    def head_arrived(self) -> None:
        self._in_request = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    async def finish_response(
        self, request: BaseRequest, resp: StreamResponse, start_time: float | None
    ) -> tuple[StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._in_request = False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self._on_slow_head(self._header_timeout)
        self.force_close()


class ClientServer(web_server.Server):
    """aiohttp's low-level server, with limits on its clients' connections."""

    def __init__(self, handler: Any, limits: EndpointLimits, service: str, **kwargs: Any) -> None:
        super().__init__(
            handler,
            request_factory=self._new_request,
            handler_cancellation=True,
            keepalive_timeout=limits.keepalive_timeout,
            **kwargs,
        )
        self._limits = limits
        self._address_of: dict[ClientConnection, str] = {}  # oldest first
        self._per_address: dict[str, int] = {}
        self.refusals = LimitedLog(
            f"endpoint {service}: closed a new connection from %s: %d open from there, %d in all "
            f"(limits: {limits.max_connections_per_client} per address, {limits.max_connections} in all)"
        )
        self.evictions = LimitedLog(
            f"endpoint {service}: at a connection limit, closed the oldest idle connection from %s"
        )
        self.slow_heads = LimitedLog(
            f"endpoint {service}: closed a connection whose request head did not arrive within %gs"
        )

    def __call__(self) -> RequestHandler:
        return ClientConnection(self, self._limits.header_timeout, loop=self._loop, **self._kwargs)

    @property
    def open_connections(self) -> int:
        return len(self._address_of)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        limits = self._limits
        address_full = self._per_address.get(address, 0) >= limits.max_connections_per_client
        full = address_full or self.open_connections >= limits.max_connections
        if full and not self._close_oldest_idle(address if address_full else None):
            self.refusals.note(address, self._per_address.get(address, 0), self.open_connections)
            transport.abort()  # at once: its descriptor is what the others need
            return
        self._address_of[cast(ClientConnection, handler)] = address
        self._per_address[address] = self._per_address.get(address, 0) + 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._forget(cast(ClientConnection, handler))
        super().connection_lost(handler, exc)

    def _close_oldest_idle(self, address: str | None) -> bool:
        """Close the oldest connection (from `address`, else from anywhere) with no request in
        progress; False when there is none."""
        for connection, there in self._address_of.items():
            if connection.idle and address in (None, there):
                self._forget(connection)
                self.evictions.note(there)
                connection.force_close()
                return True
        return False

    def _forget(self, connection: ClientConnection) -> None:
        address = self._address_of.pop(connection, None)
        if address is not None:
            left = self._per_address[address] - 1
            if left:
                self._per_address[address] = left
            else:
                del self._per_address[address]

    def _new_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> BaseRequest:
        cast(ClientConnection, protocol).head_arrived()
        return BaseRequest(message, payload, protocol, writer, task, self._loop)
