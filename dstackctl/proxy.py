"""The service endpoint: a reverse proxy on 127.0.0.1 that routes only to ready replicas.

It runs an asyncio loop (uvloop when available) in a thread of the agent. The agent sets the
routing table (`set_upstreams`) whenever readiness changes and drains a replica
(`drain`) before stopping it. Bodies stream both ways without buffering, so token streams and
server-sent events reach the client chunk by chunk. Requests go to the replicas over kept-alive
connections (upstream_pool.py); one that could not be made is retried on another replica,
and a request that met a pooled connection the replica had just closed is sent again on a new
one. With no ready replica the answer is 503 with a short JSON reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping

from aiohttp import client_exceptions, http_exceptions, web, web_server
from aiohttp.http import RawResponseMessage
from aiohttp.streams import StreamReader

from dstackctl.endpoint_answers import (
    bad_gateway,
    broken_answer,
    is_small,
    json_response,
    not_woken,
    refused_method,
    unavailable,
)
from dstackctl.endpoint_guard import EndpointGuard
from dstackctl.forwarding import CONTINUE, REFUSED_METHODS, OutgoingRequest, drop_hop_by_hop
from dstackctl.netutil import BACKLOG, EndpointError, listen
from dstackctl.request_rate import RequestRate
from dstackctl.upstream_pool import UpstreamConnection, UpstreamPool

log = logging.getLogger("dstackctl.proxy")

# Right after an agent starts (a new or restarted one) the first probe results are still on
# their way: until this long after its start, requests wait for a ready replica before a 503.
STARTUP_GRACE_SECONDS = 5.0
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
# What reading an answer raises when the replica's connection broke or the answer was garbled.
_UPSTREAM_ERRORS = (client_exceptions.ClientError, http_exceptions.HttpProcessingError, OSError)


class _Unreachable(Exception):
    """No connection could be made to the replica: nothing was sent."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.out_of_fds = isinstance(error, OSError) and error.errno in _OUT_OF_FDS


class _ClosedUnanswered(Exception):
    """The replica closed the connection (or reset it) before any byte of an answer."""


class _BadGateway(Exception):
    """The replica's answer was broken; the message says how."""


class _Exchange:
    """A request sent to a replica on `connection`, whose answer head has arrived."""

    __slots__ = ("connection", "message", "payload", "upload")

    def __init__(
        self,
        connection: UpstreamConnection,
        upload: asyncio.Task[None] | None,
        answer: tuple[RawResponseMessage, StreamReader],
    ) -> None:
        self.connection = connection
        self.upload = upload  # the rest of a streamed request body, still being sent
        self.message, self.payload = answer

    @property
    def request_sent(self) -> bool:
        upload = self.upload
        return upload is None or (upload.done() and not upload.cancelled() and upload.exception() is None)

    def end(self, pool: UpstreamPool) -> None:
        """Give the connection back: pooled when request and answer both went through whole."""
        reusable = self.request_sent and self.payload.is_eof()
        if self.upload is not None:
            self.upload.cancel()
        pool.release(self.connection, reusable)


async def _stopped(upload: asyncio.Task[None] | None) -> None:
    """Cancel `upload` and wait until it ended, so the body can be read again from the start."""
    if upload is None:
        return
    upload.cancel()
    await asyncio.wait({upload})


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Endpoint:
    def __init__(
        self,
        service: str,
        port: int,
        host: str = "127.0.0.1",
        listener: socket.socket | None = None,
        grace_from: float | None = None,
        rate: RequestRate | None = None,
        guard: EndpointGuard | None = None,
    ) -> None:
        self.service = service
        self.guard = guard or EndpointGuard(service, host)  # the Host check; the token when auth is on
        self.host = host
        self.port = port
        self._listener = listener  # bound with netutil.listen
        # The startup grace counts from here (a time.monotonic()): the agent's start.
        self._grace_from = time.monotonic() if grace_from is None else grace_from
        self._upstreams: list[tuple[str, int]] = []
        self._rotation = itertools.count()
        self._inflight: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._serve, name="endpoint", daemon=True)
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._runner: web.ServerRunner | None = None
        self._pool: UpstreamPool | None = None
        self._grace_until = 0.0
        self._changed: asyncio.Event | None = None
        self.rate = rate or RequestRate()
        self._hold = 0.0
        self._wake: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- lifecycle (called from the agent's threads) -----------------------------------

    def start(self) -> None:
        """Serve on the socket given to the constructor, else on one bound here."""
        if self._listener is None:
            self._listener = listen(self.host, self.port)
        self._thread.start()
        self._started.wait(10)
        if self._startup_error is not None:
            raise EndpointError(f"cannot start the endpoint: {self._startup_error}") from None

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):
            future.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def hold_when_idle(self, seconds: float, wake: Callable[[], None] | None) -> None:
        """With no ready replica, a request calls `wake` and waits up to `seconds` for one
        (a service that scales to zero); 0: the 503 comes after the startup grace."""
        self._hold, self._wake = seconds, wake

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
            if self._listener is not None:
                self._listener.close()
            self._loop.close()
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _startup(self) -> None:
        self._pool = UpstreamPool(self._loop)
        server = web_server.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        assert self._listener is not None
        site = web.SockSite(self._runner, self._listener, backlog=BACKLOG)
        await site.start()
        self._changed = asyncio.Event()
        elapsed = time.monotonic() - self._grace_from
        self._grace_until = self._loop.time() + max(0.0, STARTUP_GRACE_SECONDS - elapsed)

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._pool is not None:
            self._pool.close()

    def _set_upstreams(self, table: list[tuple[str, int]]) -> None:
        self._route(table)
        if table and self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _route(self, table: list[tuple[str, int]]) -> None:
        self._upstreams = table
        if self._pool is not None:
            self._pool.route_to([port for _, port in table])

    async def _drain(self, key: str, timeout: float) -> bool:
        self._route([u for u in self._upstreams if u[0] != key])
        if not self._inflight.get(key):
            return True
        idle = self._idle.setdefault(key, asyncio.Event())
        try:
            await asyncio.wait_for(idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _wait_for_upstream(self, deadline: float) -> bool:
        """Wait until the rotation has a replica or the loop's clock reaches `deadline`."""
        if self._hold > 0 and self._wake is not None:
            self._wake()  # the agent decides at once (this request is counted already)
        remaining = deadline - self._loop.time()
        if remaining <= 0 or self._changed is None:
            return False
        try:
            await asyncio.wait_for(self._changed.wait(), remaining)
        except asyncio.TimeoutError:
            return False
        return True

    def _wait_deadline(self) -> float:
        """Until when a request with no ready replica waits: the startup grace (a new agent's
        probes are on their way), or the hold of a service that scales to zero."""
        return max(self._grace_until, self._loop.time() + self._hold)

    def _pick(self, tried: set[str]) -> tuple[str, int] | None:
        candidates = [u for u in self._upstreams if u[0] not in tried] if tried else self._upstreams
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
        if request.method in REFUSED_METHODS:
            return refused_method(request.method)
        checked = self.guard.check(request)
        if isinstance(checked, web.Response):
            return checked  # refused: not counted in the request rate either
        self.rate.count()
        outgoing = OutgoingRequest(checked)
        if outgoing.expects_continue and request.transport is not None:
            request.transport.write(CONTINUE)  # the body is read (and streamed on) here
        tried: set[str] = set()
        deadline: float | None = None
        while True:
            upstream = self._pick(tried)
            if upstream is None and not tried:
                deadline = deadline or self._wait_deadline()
                if await self._wait_for_upstream(deadline):
                    continue
            if upstream is None:
                if not tried and self._hold > 0:
                    return not_woken(self.service, self._hold)
                return unavailable(self.service, retried=bool(tried))
            key, port = upstream
            self._inflight[key] = self._inflight.get(key, 0) + 1
            try:
                exchange = await self._send(outgoing, port)
                return await self._relay(request, exchange)
            except _Unreachable as exc:
                if exc.out_of_fds:
                    log.error("endpoint %s is out of file descriptors", self.service)
                    return json_response(503, {"error": "the endpoint is out of file descriptors"})
                tried.add(key)  # nothing was sent: safe to try another replica
            except _ClosedUnanswered:
                # The replica went away before answering (a crash, a reset). Without a body
                # nothing is lost by asking another replica; one that had a body may have
                # acted on it already, so it is not sent to a second replica.
                if outgoing.has_body:
                    return bad_gateway("the replica closed the connection")
                tried.add(key)
            except _BadGateway as exc:
                return bad_gateway(str(exc))
            finally:
                self._release(key)

    async def _send(self, outgoing: OutgoingRequest, port: int) -> _Exchange:
        """Send `outgoing` to the replica at `port` and wait for the head of its answer."""
        assert self._pool is not None
        connection = self._pool.take_idle(port) or await self._open(port)
        try:
            return await self._exchange(connection, outgoing)
        except _ClosedUnanswered:
            if not (connection.reused and outgoing.replayable):
                raise
        # The replica closed that idle connection as it was being reused (its keep-alive
        # timeout, a restart): the request never reached it, so send it again on a new one.
        return await self._exchange(await self._open(port), outgoing)

    async def _open(self, port: int) -> UpstreamConnection:
        assert self._pool is not None
        try:
            return await self._pool.open(port)
        except (OSError, asyncio.TimeoutError) as exc:
            raise _Unreachable(exc) from exc

    async def _exchange(self, connection: UpstreamConnection, outgoing: OutgoingRequest) -> _Exchange:
        connection.expect_response(outgoing.head_only)
        upload: asyncio.Task[None] | None = None
        try:
            upload = outgoing.send(connection)
            answer = await connection.read_response()
        except _UPSTREAM_ERRORS as exc:
            connection.close()
            await _stopped(upload)
            if connection.responded:
                raise _BadGateway(broken_answer(exc)) from exc
            raise _ClosedUnanswered from exc
        except BaseException:  # cancelled: the server is shutting down
            connection.close()
            if upload is not None:
                upload.cancel()
            raise
        return _Exchange(connection, upload, answer)

    async def _relay(self, request: web.BaseRequest, exchange: _Exchange) -> web.StreamResponse:
        """Pass the replica's answer on to the client, streaming its body as it arrives."""
        assert self._pool is not None
        message, payload = exchange.message, exchange.payload
        if is_small(message.headers, payload):
            # Head and body go out in one write; a stream, or a large body, goes on as it comes.
            try:
                body = payload.read_nowait() if payload.is_eof() else await payload.read()
            except _UPSTREAM_ERRORS as exc:
                return bad_gateway(broken_answer(exc))
            finally:
                exchange.end(self._pool)
            whole = web.Response(
                status=message.code, reason=message.reason, headers=message.headers, body=body or None
            )
            drop_hop_by_hop(whole.headers)
            return whole
        response = web.StreamResponse(status=message.code, reason=message.reason, headers=message.headers)
        drop_hop_by_hop(response.headers)
        try:
            await response.prepare(request)
            while chunk := await payload.readany():
                await response.write(chunk)
            await response.write_eof()
        except _UPSTREAM_ERRORS:
            # The replica or the client went away mid-response: nothing left to deliver.
            if request.transport is not None:
                request.transport.close()
        finally:
            exchange.end(self._pool)
        return response
