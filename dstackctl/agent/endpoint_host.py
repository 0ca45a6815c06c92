"""The service endpoint inside the agent: bound at once, served once the first containers exist,
its rotation fed by the replica book (every phase change is pushed here).

A supervised agent takes the listening socket its supervisor kept from the agent before it
(clients waited in its backlog meanwhile) and hands the supervisor each socket it binds. A new
local port moves the endpoint: the new socket serves before the old one closes.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from dstackctl.agent.phases import ReplicaBook, ReplicaState
from dstackctl.agent.supervisor import HANG_SECONDS, SupervisorLink
from dstackctl.endpoint_guard import EndpointGuard
from dstackctl.netutil import EndpointError, listen
from dstackctl.request_rate import RequestRate
from dstackctl.status import ProbeView
from dstackctl.timeutil import parse_utc

if TYPE_CHECKING:
    from dstackctl.proxy import Endpoint

ENDPOINT_HOST = "127.0.0.1"
DRAIN_SECONDS = 30.0
# A replica without probes that the endpoint ejected comes back after this long (nginx's
# fail_timeout is 10 s): a connect check would pass for a hung one behind Docker's proxy.
PROBELESS_EJECTION_SECONDS = 10.0

log = logging.getLogger("dstackctl.agent")


class EndpointHost:
    def __init__(
        self, name: str, book: ReplicaBook, grace_from: float, link: SupervisorLink | None = None
    ) -> None:
        self._name = name
        self._link = link
        self._failed_port: int | None = None
        self._tick = time.monotonic()  # the endpoint loop's last sign of life
        self._ejected_at: dict[str, datetime] = {}  # when the agent first saw each ejection
        self._check_now: Callable[[str], str | None] | None = None
        self._book = book
        self._grace_from = grace_from
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._handover = threading.Lock()  # the listener and the endpoint change together
        self._starting_on: socket.socket | None = None
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
        `ps` and `run -d` can give the URL, even before the proxy serves them. A different
        port than the one bound moves the endpoint there."""
        if port is None or port == self._failed_port or port == self.port:
            return
        try:
            listener = self._inherited(port) or self._listen(port)
        except EndpointError as exc:
            self._failed_port, self.error = port, exc.message
            log.error("%s", exc.message)
            return
        self._failed_port, self.error = None, None
        with self._handover:  # the endpoint may be starting on the old socket
            old, self._listener = self._listener, listener
            self.url = f"http://{ENDPOINT_HOST}:{port}"
            if old is None:
                log.info("endpoint bound to %s", self.url)
            elif self.endpoint is not None:
                self.endpoint.move_to(listener)
                log.info("endpoint moved to %s", self.url)
            elif old is not self._starting_on:  # else `_start` moves it once it serves
                old.close()

    @property
    def port(self) -> int | None:
        return self._listener.getsockname()[1] if self._listener is not None else None

    def _inherited(self, port: int) -> socket.socket | None:
        inherited = self._link.inherited if self._link else None
        if inherited is None or inherited.getsockname()[1] != port:
            return None
        assert self._link is not None
        self._link.inherited = None
        log.info("endpoint port %d kept open by the supervisor while the agent restarted", port)
        return inherited

    def _listen(self, port: int) -> socket.socket:
        listener = listen(ENDPOINT_HOST, port)
        if self._link is not None:
            self._link.keep_listener(listener)
        return listener

    def confirm_hangs_with(self, check_now: Callable[[str], str | None]) -> None:
        """Probe a replica the endpoint suspects of hanging with `check_now` (its probes, at
        once: a failure's error, or None); a failure ejects it."""
        self._check_now = check_now

    def _suspected(self, key: str) -> None:  # in the endpoint's loop: must not block
        threading.Thread(target=self._confirm_hang, args=(key,), name="hang-check", daemon=True).start()

    def _confirm_hang(self, key: str) -> None:
        check_now, endpoint = self._check_now, self.endpoint
        failure = check_now(key) if check_now is not None else None
        if failure is not None and endpoint is not None:
            endpoint.eject(key, f"requests waited on it without an answer and its {failure}")

    def readmit_probed(self, probes_of: Callable[[str], tuple[ProbeView, ...] | None]) -> None:
        """Put a replica that the endpoint ejected (its requests failed) back in rotation once
        a probe of it passed after the ejection and none fails; one without probes after
        PROBELESS_EJECTION_SECONDS (nothing else checks it)."""
        endpoint = self.endpoint
        if endpoint is None:
            return
        ejected = endpoint.ejected()
        self._ejected_at = {key: at for key, at in self._ejected_at.items() if key in ejected}
        for key in ejected:
            since = self._ejected_at.setdefault(key, datetime.now(timezone.utc))
            probes = probes_of(key)
            if probes is None:
                continue
            if _passed_since(probes, since):
                endpoint.readmit(key)

    def responsive(self) -> bool:
        """False when the endpoint's loop has not run a callback for HANG_SECONDS."""
        endpoint = self.endpoint
        if endpoint is None:
            return True
        endpoint.call_soon(self._ticked)
        return time.monotonic() - self._tick < HANG_SECONDS

    def _ticked(self) -> None:
        self._tick = time.monotonic()

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
        self._starting_on = self._listener
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
        from dstackctl.aiohttp_loading import load_aiohttp

        load_aiohttp()  # before dstackctl.proxy imports it: see aiohttp_loading.py
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
        self._tick = time.monotonic()
        endpoint.watch_stalls(self._suspected)
        with self._handover:
            self.endpoint = endpoint
            current = self._listener
            if current is not None and current is not listener:  # the port changed meanwhile
                endpoint.move_to(current)
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


def _passed_since(probes: tuple[ProbeView, ...], since: datetime) -> bool:
    if not probes:
        return datetime.now(timezone.utc) - since >= timedelta(seconds=PROBELESS_EJECTION_SECONDS)
    if any(p.failure_streak or not p.ready for p in probes):
        return False
    return any(p.last_checked_at is not None and parse_utc(p.last_checked_at) > since for p in probes)
