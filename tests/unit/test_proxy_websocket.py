"""WebSockets through the endpoint, against a real WebSocket server (aiohttp's) as the replica."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from helpers import wait_until
from test_proxy_pool import WAIT, no_startup_grace
from test_proxy_timeouts import endpoint_with

from dstackctl.endpoint_limits import EndpointLimits

__all__ = ["no_startup_grace"]  # the fixture, used here too


class WebSocketReplica:
    """Greets each WebSocket client, echoes text with a prefix and bytes reversed."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.received: list[str | bytes] = []
        self.closed = threading.Event()
        self._loop = asyncio.new_event_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = listener.getsockname()[1]
        app = web.Application()
        app.router.add_get("/ws", self._serve)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.SockSite(self._runner, listener).start())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(WAIT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT)

    async def _serve(self, request: web.Request) -> web.WebSocketResponse:
        self.headers = dict(request.headers)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello from the replica")
        async for message in ws:
            self.received.append(message.data)
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo: {message.data}")
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        self.closed.set()
        return ws


@pytest.fixture
def replica() -> Iterator[WebSocketReplica]:
    server = WebSocketReplica()
    yield server
    server.close()


async def talk(url: str, messages: list[str | bytes], gap: float = 0.0) -> list[str | bytes]:
    """Connect, send `messages` (`gap` seconds apart), return what came back, then close."""
    heard: list[str | bytes] = []
    timeout = aiohttp.ClientWSTimeout(ws_receive=WAIT)
    async with aiohttp.ClientSession() as session, session.ws_connect(url, timeout=timeout) as ws:
        heard.append((await ws.receive()).data)
        for message in messages:
            await asyncio.sleep(gap)
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_str(message)
            heard.append((await ws.receive()).data)
    return heard


def test_a_websocket_carries_messages_both_ways_until_the_client_closes(replica: WebSocketReplica) -> None:
    endpoint = endpoint_with(EndpointLimits(), ws=replica.port)
    try:
        heard = asyncio.run(talk(endpoint.url + "/ws", ["ping 1", b"\x01\x02\x03", "ping 2"]))
        wait_until(replica.closed.is_set, timeout=WAIT, what="the replica to see the close")
        wait_until(lambda: endpoint.inflight("ws") == 0, timeout=WAIT, what="the tunnel to end")
    finally:
        endpoint.close()

    assert heard == ["hello from the replica", "echo: ping 1", b"\x03\x02\x01", "echo: ping 2"]
    assert replica.received == ["ping 1", b"\x01\x02\x03", "ping 2"]
    assert (replica.headers["Upgrade"].lower(), replica.headers["Connection"].lower()) == (
        "websocket",
        "upgrade",
    )


def test_a_websocket_in_use_outlives_the_read_timeout(replica: WebSocketReplica) -> None:
    endpoint = endpoint_with(EndpointLimits(read_timeout=1), ws=replica.port)
    try:
        # 6 messages 0.4 s apart: 2.4 s in all, more than the timeout, never 1 s quiet
        heard = asyncio.run(talk(endpoint.url + "/ws", [f"m{i}" for i in range(6)], gap=0.4))
    finally:
        endpoint.close()

    assert heard == ["hello from the replica"] + [f"echo: m{i}" for i in range(6)]


def test_a_websocket_quiet_both_ways_for_the_read_timeout_is_closed(replica: WebSocketReplica) -> None:
    async def wait_quietly(url: str) -> aiohttp.WSMsgType:
        timeout = aiohttp.ClientWSTimeout(ws_receive=WAIT * 2)
        async with aiohttp.ClientSession() as session, session.ws_connect(url, timeout=timeout) as ws:
            await ws.receive()  # the greeting
            return (await ws.receive()).type

    endpoint = endpoint_with(EndpointLimits(read_timeout=1), ws=replica.port)
    try:
        ended_with = asyncio.run(wait_quietly(endpoint.url + "/ws"))
    finally:
        endpoint.close()

    assert ended_with in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE)
