"""Keep-alive connections from the endpoint to its replicas.

aiohttp's ClientSession cost the endpoint about 100 µs of CPU per request (URL objects, a
ClientRequest and a ClientResponse, cookie jar, timers, tracing hooks): most of its budget.
The endpoint only speaks HTTP/1.1 to 127.0.0.1, so it keeps idle connections per replica
port itself, writes the request as bytes straight to the transport, and reads the answer
with aiohttp's C response parser through `ResponseHandler`, the protocol ClientSession uses
underneath. That class is not public API, hence aiohttp is pinned to one minor version.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Collection

from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawResponseMessage
from aiohttp.streams import StreamReader

UPSTREAM_HOST = "127.0.0.1"
CONNECT_TIMEOUT_SECONDS = 5.0
# Idle connections are closed after this long, and at most this many are kept per replica
# (the rest of a burst is closed as it ends).
IDLE_TIMEOUT_SECONDS = 30.0
MAX_IDLE_PER_REPLICA = 100


class UpstreamProtocol(ResponseHandler):
    """ResponseHandler that notes whether any byte of an answer arrived."""

    responded = False

    def data_received(self, data: bytes) -> None:
        self.responded = True
        super().data_received(data)


class UpstreamConnection:
    """One connection to a replica; `reused` once it served a request before this one."""

    __slots__ = ("idle_since", "port", "protocol", "reused")

    def __init__(self, port: int, protocol: UpstreamProtocol) -> None:
        self.port = port
        self.protocol = protocol
        self.reused = False
        self.idle_since = 0.0

    @property
    def usable(self) -> bool:
        """Open, with the last answer read to its end and nothing unexpected after it."""
        return self.protocol.is_connected() and not self.protocol.should_close

    @property
    def responded(self) -> bool:
        """True when the replica sent any byte of an answer to the current request."""
        return self.protocol.responded

    def expect_response(self, head_only: bool, read_timeout: float | None = None) -> None:
        """Get ready for the answer to a new request (`head_only`: to a HEAD request); reading
        it fails with a TimeoutError once the replica sent nothing for `read_timeout` seconds."""
        self.protocol.responded = False
        self.protocol.set_response_params(
            skip_payload=head_only, read_until_eof=True, auto_decompress=False, read_timeout=read_timeout
        )

    def write(self, data: bytes) -> None:
        """Send `data`; the read timeout counts from the last byte sent or received."""
        transport = self.protocol.transport
        if transport is None:
            raise ConnectionResetError("the replica closed the connection")
        transport.write(data)
        self.protocol.start_timeout()

    async def drain(self) -> None:
        if self.protocol.writing_paused:
            await self.protocol._drain_helper()

    async def read_response(self) -> tuple[RawResponseMessage, StreamReader]:
        """The head and body stream of the answer; informational (1xx) answers are skipped."""
        while True:
            message, payload = await self.protocol.read()
            if not 100 <= message.code < 200 or message.code == 101:
                return message, payload

    def close(self) -> None:
        self.protocol.close()


class UpstreamPool:
    """Idle keep-alive connections per replica port, newest first.

    Only connections to the ports in rotation (`route_to`) are kept: those to a replica that
    left are closed as soon as they are idle, so a stopped replica leaves no open fd here.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
        max_idle_per_replica: int = MAX_IDLE_PER_REPLICA,
    ) -> None:
        self._loop = loop
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle_per_replica
        self._idle: dict[int, deque[UpstreamConnection]] = {}
        self._ports: frozenset[int] = frozenset()
        self._sweeper = loop.call_later(idle_timeout / 2, self._sweep)

    async def connect(self, port: int) -> UpstreamConnection:
        """An idle connection to `port`, else a new one (see `open`)."""
        return self.take_idle(port) or await self.open(port)

    def take_idle(self, port: int) -> UpstreamConnection | None:
        """The idle connection to `port` used last, if one is still open."""
        idle = self._idle.get(port)
        while idle:
            connection = idle.pop()
            if connection.usable:
                connection.reused = True
                return connection
            connection.close()
        return None

    async def open(self, port: int) -> UpstreamConnection:
        """A new connection to `port`; OSError or asyncio.TimeoutError when none could be made."""
        _, protocol = await asyncio.wait_for(
            self._loop.create_connection(lambda: UpstreamProtocol(self._loop), UPSTREAM_HOST, port),
            CONNECT_TIMEOUT_SECONDS,
        )
        return UpstreamConnection(port, protocol)

    def release(self, connection: UpstreamConnection, reusable: bool) -> None:
        """Keep `connection` for the next request when it can carry one, else close it."""
        if not (reusable and connection.port in self._ports and connection.usable):
            connection.close()
            return
        idle = self._idle.setdefault(connection.port, deque())
        if len(idle) >= self._max_idle:
            idle.popleft().close()
        connection.idle_since = self._loop.time()
        idle.append(connection)

    def route_to(self, ports: Collection[int]) -> None:
        """Keep connections to `ports` only; close the idle ones to every other port."""
        self._ports = frozenset(ports)
        for port in [p for p in self._idle if p not in self._ports]:
            _close_all(self._idle.pop(port))

    def idle_count(self, port: int) -> int:
        return len(self._idle.get(port, ()))

    def close(self) -> None:
        self._sweeper.cancel()
        self._ports = frozenset()
        for idle in self._idle.values():
            _close_all(idle)
        self._idle.clear()

    def _sweep(self) -> None:
        oldest_kept = self._loop.time() - self._idle_timeout
        for port, idle in list(self._idle.items()):
            while idle and (idle[0].idle_since <= oldest_kept or not idle[0].usable):
                idle.popleft().close()
            if not idle:
                del self._idle[port]
        self._sweeper = self._loop.call_later(self._idle_timeout / 2, self._sweep)


def _close_all(connections: deque[UpstreamConnection]) -> None:
    while connections:
        connections.pop().close()
