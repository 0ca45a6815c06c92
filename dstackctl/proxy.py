"""The service endpoint: a reverse proxy on 127.0.0.1 that routes only to ready replicas.

It runs an asyncio loop (uvloop when available) in a thread of the agent. The agent sets the
routing table (`set_upstreams`) whenever readiness changes and drains a replica
(`drain`) before stopping it. Bodies stream both ways without buffering, so token streams and
server-sent events reach the client chunk by chunk. A request whose connection to a replica
could not be made is retried on another replica; with no ready replica the answer is 503 with
a short JSON reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, client_exceptions, web, web_server

from dstackctl.errors import DstackctlError

log = logging.getLogger("dstackctl.proxy")

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
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
        "host",
    }
)
UPSTREAM_HOST = "127.0.0.1"
# Right after the endpoint starts (a new or restarted agent) the first probe results are
# still on their way: requests wait this long for a ready replica before a 503.
STARTUP_GRACE_SECONDS = 5.0


class EndpointError(DstackctlError):
    pass


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Endpoint:
    def __init__(self, service: str, port: int, host: str = "127.0.0.1") -> None:
        self.service = service
        self.host = host
        self.port = port
        self._upstreams: list[tuple[str, int]] = []
        self._rotation = itertools.count()
        self._inflight: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._serve, name="endpoint", daemon=True)
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._runner: web.ServerRunner | None = None
        self._session: ClientSession | None = None
        self._grace_until = 0.0
        self._changed: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- lifecycle (called from the agent's threads) -----------------------------------

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)
        if self._startup_error is not None:
            error = self._startup_error
            if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
                raise EndpointError(
                    f"port {self.port} on {self.host} is in use by another program; choose another "
                    f"with --port or `port: LOCAL:CONTAINER`"
                ) from None
            if isinstance(error, OSError):
                raise EndpointError(f"cannot listen on {self.host}:{self.port}: {error.strerror}") from None
            raise EndpointError(f"cannot start the endpoint: {error}") from None

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):
            future.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def set_upstreams(self, upstreams: Mapping[str, int]) -> None:
        """Replace the rotation: replica key -> host port of every ready replica."""
        table = sorted(upstreams.items())
        self._loop.call_soon_threadsafe(self._set_upstreams, table)

    def drain(self, key: str, timeout: float) -> bool:
        """Take `key` out of rotation and wait until its in-flight requests finished.

        Returns False when requests were still running after `timeout` seconds.
        """
        if not self._thread.is_alive():
            return True
        future = asyncio.run_coroutine_threadsafe(self._drain(key, timeout), self._loop)
        return bool(future.result(timeout + 5))

    def inflight(self, key: str) -> int:
        return self._inflight.get(key, 0)

    # --- inside the loop ----------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._startup())
        except BaseException as exc:
            self._startup_error = exc
            self._loop.run_until_complete(self._shutdown())
            self._loop.close()
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _startup(self) -> None:
        self._session = ClientSession(
            connector=TCPConnector(limit=0, ttl_dns_cache=None, force_close=False),
            timeout=ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        server = web_server.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, backlog=1024)
        await site.start()
        self._changed = asyncio.Event()
        self._grace_until = self._loop.time() + STARTUP_GRACE_SECONDS

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _set_upstreams(self, table: list[tuple[str, int]]) -> None:
        self._upstreams = table
        if table and self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _drain(self, key: str, timeout: float) -> bool:
        self._upstreams = [u for u in self._upstreams if u[0] != key]
        if not self._inflight.get(key):
            return True
        idle = self._idle.setdefault(key, asyncio.Event())
        try:
            await asyncio.wait_for(idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _wait_for_first_upstream(self) -> bool:
        """During the startup grace, wait for a ready replica; True when one arrived."""
        remaining = self._grace_until - self._loop.time()
        if remaining <= 0 or self._changed is None:
            return False
        try:
            await asyncio.wait_for(self._changed.wait(), remaining)
        except asyncio.TimeoutError:
            return False
        return True

    def _pick(self, tried: set[str]) -> tuple[str, int] | None:
        candidates = [u for u in self._upstreams if u[0] not in tried]
        if not candidates:
            return None
        return candidates[next(self._rotation) % len(candidates)]

    def _release(self, key: str) -> None:
        remaining = self._inflight[key] - 1
        self._inflight[key] = remaining
        if remaining == 0:
            event = self._idle.pop(key, None)
            if event is not None:
                event.set()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        peer = request.remote or ""
        forwarded = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{forwarded}, {peer}" if forwarded else peer
        has_body = request.body_exists
        tried: set[str] = set()
        while True:
            upstream = self._pick(tried)
            if upstream is None and not tried and await self._wait_for_first_upstream():
                continue
            if upstream is None:
                return _unavailable(self.service, retried=bool(tried))
            key, port = upstream
            self._inflight[key] = self._inflight.get(key, 0) + 1
            try:
                try:
                    upstream_response = await self._session.request(
                        request.method,
                        f"http://{UPSTREAM_HOST}:{port}{request.raw_path}",
                        headers=headers,
                        data=request.content if has_body else None,
                        allow_redirects=False,
                        compress=False,
                    )
                except client_exceptions.ClientConnectorError as exc:
                    if exc.os_error.errno in (errno.EMFILE, errno.ENFILE):
                        log.error("endpoint %s is out of file descriptors", self.service)
                        return _json_response(503, {"error": "the endpoint is out of file descriptors"})
                    tried.add(key)  # nothing was sent: safe to try another replica
                    continue
                except (client_exceptions.ServerDisconnectedError, client_exceptions.ClientOSError):
                    # The replica went away before answering (a crash, a reset). Without a
                    # body nothing is lost by asking another replica; a streamed body is gone.
                    if has_body:
                        return _bad_gateway("the replica closed the connection")
                    tried.add(key)
                    continue
                except client_exceptions.ClientError as exc:
                    return _bad_gateway(f"{type(exc).__name__}")
                return await self._relay(request, upstream_response)
            finally:
                self._release(key)

    async def _relay(self, request: web.BaseRequest, upstream: Any) -> web.StreamResponse:
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            if upstream.headers.get("Content-Length") is None:
                response.enable_chunked_encoding()
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (client_exceptions.ClientError, ConnectionResetError):
                # The replica or the client went away mid-response: nothing left to deliver.
                if request.transport is not None:
                    request.transport.close()
            return response


def _json_response(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers={"Retry-After": "1"} if status == 503 else None,
    )


def _unavailable(service: str, retried: bool) -> web.Response:
    reason = "no replica could be reached" if retried else "no replica is ready"
    return _json_response(503, {"error": reason, "service": service})


def _bad_gateway(reason: str) -> web.Response:
    return _json_response(502, {"error": reason})
