"""The service endpoint: a reverse proxy on 127.0.0.1 that routes only to ready replicas.

It runs an asyncio loop (uvloop when available) in a thread of the agent. The agent sets the
routing table (`set_upstreams`) whenever readiness changes and drains a replica
(`drain`) before stopping it. Bodies stream both ways without buffering, so token streams and
server-sent events reach the client chunk by chunk. Requests go to the replicas over kept-alive
connections (upstream_pool.py); one that could not be made is retried on another replica,
and a request that met a pooled connection the replica had just closed is sent again on a new
one. With no ready replica the answer is 503 with a short JSON reason. A replica silent for the
read timeout gets a 504; one that real requests found dead or hung leaves the rotation
(upstream_health.py); a client that leaves cancels its request (client_connections.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping

from aiohttp import web

from dstackctl.client_connections import ClientServer, LimitedLog
from dstackctl.endpoint_answers import (
    bad_gateway,
    gateway_timeout,
    json_response,
    not_woken,
    refused_method,
    unavailable,
)
from dstackctl.endpoint_guard import EndpointGuard
from dstackctl.endpoint_limits import EndpointLimits
from dstackctl.forwarding import CONTINUE, REFUSED_METHODS, OutgoingRequest
from dstackctl.netutil import BACKLOG, EndpointError, listen
from dstackctl.request_rate import RequestRate
from dstackctl.stall_watch import StallWatch
from dstackctl.upstream_exchange import BadGateway, ClosedUnanswered, Forwarder, Unreachable, UpstreamTimeout
from dstackctl.upstream_health import Ejections
from dstackctl.upstream_pool import UpstreamPool

log = logging.getLogger("dstackctl.proxy")

# Right after an agent starts (a new or restarted one) the first probe results are still on
# their way: until this long after its start, requests wait for a ready replica before a 503.
STARTUP_GRACE_SECONDS = 5.0
STALL_CHECK_SECONDS = 1.0


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
        limits: EndpointLimits | None = None,
    ) -> None:
        self.service = service
        self.guard = guard or EndpointGuard(service, host)  # the Host check; the token when auth is on
        self.host = host
        self.port = port
        self._listener = listener  # bound with netutil.listen
        # The startup grace counts from here (a time.monotonic()): the agent's start.
        self._grace_from = time.monotonic() if grace_from is None else grace_from
        self._limits = (limits or EndpointLimits()).within_open_file_limit()
        self._table: list[tuple[str, int]] = []  # as the agent set it, less drained replicas
        self._upstreams: list[tuple[str, int]] = []  # the rotation: the table less ejected replicas
        self._ejections = Ejections(self._limits.eject_after_failures)
        self._stalls = StallWatch(self._limits.suspect_after)
        self._on_suspect: Callable[[str], None] | None = None
        self._out_of_fds = LimitedLog(f"endpoint {service} is out of file descriptors")
        self._rotation = itertools.count()
        self._inflight: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._serve, name="endpoint", daemon=True)
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.SockSite | None = None
        self._pool: UpstreamPool | None = None
        self._forwarder: Forwarder | None = None
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

    def ejected(self) -> set[str]:
        """The replicas taken out of rotation for failed requests, until `readmit`."""
        return self._ejections.ejected()

    def watch_stalls(self, on_suspect: Callable[[str], None]) -> None:
        """Tell `on_suspect(key)` (from the endpoint's thread: it must not block) about a
        replica that keeps requests waiting without answering any (see stall_watch.py)."""
        self._on_suspect = on_suspect

    def eject(self, key: str, why: str) -> None:
        """Take `key` out of rotation (its probe confirmed a hang) until `readmit`; its waiting
        GETs go to another replica."""
        self._loop.call_soon_threadsafe(self._eject, key, why)

    def readmit(self, key: str) -> None:
        """Put an ejected replica back in rotation (its probe passed since)."""
        if self._ejections.readmit(key):
            log.info("endpoint %s: replica %s is back in rotation", self.service, key[:12])
            self._loop.call_soon_threadsafe(lambda: self._route(self._table))

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` in the endpoint's loop (the agent's heartbeat checks the loop lives)."""
        self._loop.call_soon_threadsafe(callback)

    def move_to(self, listener: socket.socket) -> None:
        """Serve on `listener` from now on, then close the old one (a new local port)."""
        future = asyncio.run_coroutine_threadsafe(self._move_to(listener), self._loop)
        future.result(10)

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
        self._forwarder = Forwarder(self._pool, self._limits.read_timeout, self._stalls)
        server = ClientServer(self._handle, self._limits, self.service, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        assert self._listener is not None
        site = web.SockSite(self._runner, self._listener, backlog=BACKLOG)
        await site.start()
        self._site = site
        self._changed = asyncio.Event()
        self._look_for_stalls()
        elapsed = time.monotonic() - self._grace_from
        self._grace_until = self._loop.time() + max(0.0, STARTUP_GRACE_SECONDS - elapsed)

    async def _move_to(self, listener: socket.socket) -> None:
        assert self._runner is not None and self._site is not None
        site = web.SockSite(self._runner, listener, backlog=BACKLOG)
        await site.start()
        old, old_listener = self._site, self._listener
        self._site, self._listener = site, listener
        self.port = listener.getsockname()[1]
        await old.stop()
        if old_listener is not None:
            old_listener.close()  # uvloop serves a duplicate of it: both must go

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
        self._table = table
        self._ejections.keep_only([key for key, _ in table])
        self._stalls.forget({key for key, _ in table})
        rotation = [u for u in table if not self._ejections.is_ejected(u[0])]
        if table and not rotation:  # ejected ones are better than none
            log.warning("endpoint %s: ejected replicas back in rotation: no other one is ready", self.service)
            self._ejections.keep_only(())
            rotation = table
        self._upstreams = rotation
        if self._pool is not None:
            self._pool.route_to([port for _, port in rotation])

    def _eject(self, key: str, why: str) -> None:
        if all(k != key for k, _ in self._upstreams) or not self._ejections.eject(key, len(self._upstreams)):
            return
        moved = self._stalls.abandon(key)
        log.warning(
            "endpoint %s: replica %s out of rotation: %s; %d waiting request(s) sent elsewhere;"
            " it comes back when its probe passes",
            *(self.service, key[:12], why, moved),
        )
        self._route(self._table)

    def _look_for_stalls(self) -> None:
        self._loop.call_later(STALL_CHECK_SECONDS, self._look_for_stalls)
        on_suspect = self._on_suspect
        if on_suspect is None:
            return
        for key in self._stalls.suspects(self._loop.time()):
            if any(k == key for k, _ in self._upstreams):
                on_suspect(key)

    def _failed(self, key: str, why: str) -> None:
        """A request to `key` failed as a dead or hung replica's do: eject it after a few."""
        if all(k != key for k, _ in self._upstreams):
            return  # drained or ejected already
        in_a_row = self._ejections.failed(key, len(self._upstreams))
        if in_a_row:
            log.warning(
                "endpoint %s: replica %s out of rotation after %d failed requests in a row (the last: %s);"
                " it comes back when its probe passes",
                *(self.service, key[:12], in_a_row, why),
            )
            self._route(self._table)

    async def _drain(self, key: str, timeout: float) -> bool:
        self._route([u for u in self._table if u[0] != key])
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
        """The replica with the fewest requests in flight (a hung one gathers them), in turn
        among equals."""
        candidates = [u for u in self._upstreams if u[0] not in tried] if tried else self._upstreams
        if len(candidates) > 1:
            inflight = self._inflight
            fewest = min(inflight.get(key, 0) for key, _ in candidates)
            candidates = [u for u in candidates if inflight.get(u[0], 0) == fewest]
        elif not candidates:
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
            answer = await self._forward(request, outgoing, *upstream)
            if answer is not None:
                return answer
            tried.add(upstream[0])  # nothing reached that replica: another one may answer

    async def _forward(
        self, request: web.BaseRequest, outgoing: OutgoingRequest, key: str, port: int
    ) -> web.StreamResponse | None:
        """The answer of replica `key` (at `port`), or None when another replica should be asked.

        A client that leaves cancels this (aiohttp's handler_cancellation): the replica's
        connection is closed and the request is never sent elsewhere.
        """
        assert self._forwarder is not None
        self._inflight[key] = self._inflight.get(key, 0) + 1
        try:
            exchange = await self._forwarder.send_watched(request, outgoing, key, port)
            if exchange is None:
                return None  # the replica was ejected as hung: another one answers this GET
            self._ejections.answered(key)
            return await self._forwarder.relay(request, exchange, outgoing.upgrade)
        except Unreachable as exc:
            if exc.out_of_fds:
                self._out_of_fds.note()
                return json_response(503, {"error": "the endpoint is out of file descriptors"})
            self._failed(key, f"no connection: {exc}")
            return None
        except ClosedUnanswered:
            self._failed(key, "closed the connection before answering")
            # Without a body nothing is lost by asking another replica; one that had a body
            # may have acted on it already, so it is not sent to a second replica.
            return bad_gateway("the replica closed the connection") if outgoing.has_body else None
        except UpstreamTimeout:
            self._failed(key, f"no answer within {self._limits.read_timeout:g}s")
            return gateway_timeout(self._limits.read_timeout)
        except BadGateway as exc:
            return bad_gateway(str(exc))
        finally:
            self._release(key)
