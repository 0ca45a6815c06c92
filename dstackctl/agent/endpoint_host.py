"""The service endpoint inside the agent: bound at once, served once the first containers exist,
its rotation fed by the replica book (every phase change is pushed here)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from dstackctl.agent.phases import ReplicaBook, ReplicaState
from dstackctl.endpoint_guard import EndpointGuard
from dstackctl.netutil import EndpointError, listen
from dstackctl.request_rate import RequestRate

if TYPE_CHECKING:
    from dstackctl.proxy import Endpoint

ENDPOINT_HOST = "127.0.0.1"
DRAIN_SECONDS = 30.0

log = logging.getLogger("dstackctl.agent")


class EndpointHost:
    def __init__(self, name: str, book: ReplicaBook, grace_from: float) -> None:
        self._name = name
        self._book = book
        self._grace_from = grace_from
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.endpoint: Endpoint | None = None
        self.url: str | None = None
        self.error: str | None = None
        self.rate = RequestRate()  # counted by the endpoint, read by the autoscaler
        # Refuses every request until `protect` says whether the service wants a token.
        self.guard = EndpointGuard(name, ENDPOINT_HOST, token_required=True)
        self._access: tuple[bool, bool] | None = None  # (token required, token readable) logged
        self._hold: tuple[float, Callable[[], None] | None] = (0.0, None)
        book.subscribe(self._on_change)

    def bind(self, port: int | None) -> None:
        """Take the endpoint's port at once: from here connections wait in its backlog, and
        `ps` and `run -d` can give the URL, even before the proxy serves them."""
        if self._listener is not None or self.error or port is None:
            return
        try:
            self._listener = listen(ENDPOINT_HOST, port)
        except EndpointError as exc:
            self.error = exc.message
            log.error("%s", exc.message)
            return
        self.url = f"http://{ENDPOINT_HOST}:{port}"
        log.info("endpoint bound to %s", self.url)

    def protect(self, required: bool, token: str | None) -> None:
        """Require the service's bearer token (`auth: true`) at the endpoint, or not. A token
        that is required but could not be read refuses every request: it fails closed."""
        self.guard.require(required, token)
        access = (required, token is not None)
        if access == self._access:
            return
        self._access = access
        if required and token is None:
            log.error(
                "auth is on but the token file cannot be read: the endpoint refuses every request "
                "until `dstackctl token %s` makes a new token",
                self._name,
            )
        else:
            log.info("the endpoint %s", "requires a bearer token" if required else "needs no token")

    def start_soon(self) -> None:
        """Start serving the bound endpoint from a thread, once the first containers were
        created: importing aiohttp takes ~0.2 s of CPU, which Docker needs while it creates
        containers on a small machine."""
        if self._thread is not None or self._listener is None:
            return
        self._thread = threading.Thread(
            target=self._start, args=(self._listener,), name="endpoint-start", daemon=True
        )
        self._thread.start()

    def hold_when_idle(self, seconds: float, wake: Callable[[], None] | None) -> None:
        """See Endpoint.hold_when_idle; kept for an endpoint that is not serving yet."""
        self._hold = (seconds, wake)
        if self.endpoint is not None:
            self.endpoint.hold_when_idle(seconds, wake)

    def route_to(self, group: str | None) -> None:
        """Send traffic to this group's replicas only (the router group); None: to every group."""
        if self._book.route_to(group) and self.endpoint is not None:
            log.info("the endpoint routes to %s", f"group {group}" if group else "every group")
            self._book.apply_rotation(self.endpoint.set_upstreams)

    def drain(self, container_id: str, timeout: float = DRAIN_SECONDS) -> bool:
        """Wait until the replica's in-flight requests are done; False when time ran out."""
        endpoint = self.endpoint
        return endpoint.drain(container_id, timeout) if endpoint is not None else True

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(10)
        if self.endpoint is not None:
            self.endpoint.close()
        elif self._listener is not None:
            self._listener.close()

    def _start(self, listener: socket.socket) -> None:
        from dstackctl.proxy import Endpoint

        host, port = listener.getsockname()
        endpoint = Endpoint(
            self._name, port, host, listener, grace_from=self._grace_from, rate=self.rate, guard=self.guard
        )
        endpoint.hold_when_idle(*self._hold)
        try:
            endpoint.start()
        except EndpointError as exc:
            self.error = exc.message
            log.error("%s", exc.message)
            return
        self.endpoint = endpoint
        self._book.apply_rotation(endpoint.set_upstreams)
        log.info("endpoint serving on %s", endpoint.url)

    def _on_change(self, before: ReplicaState | None, after: ReplicaState | None) -> None:
        was = before is not None and before.ready
        now = after is not None and after.ready
        if was == now:
            return
        endpoint = self.endpoint
        if endpoint is not None:  # called under the book's lock: rotations apply in order
            endpoint.set_upstreams(self._book.in_rotation())
