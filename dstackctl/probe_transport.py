"""How the probe runner gets its probes done.

`ProbeLoop` runs every probe and connect check on non-blocking sockets, driven by the
runner's one thread through `poll`: no thread per probe in flight. At 1000 probes/s a pool
of 32 blocking workers cost 37 % of a core, most of it in switching between those threads.
`CallTransport` runs given blocking functions on a small pool instead, for tests that
script the outcomes.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import selectors
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from time import monotonic

from dstackctl.config.probe_model import ProbeConfig
from dstackctl.probe_wire import (
    CONNECT_TIMEOUT_SECONDS,
    STATUS_LINE_CAP_BYTES,
    ProbeResult,
    answer_of,
    failure_of,
    head_complete,
    request_bytes,
    timed_out,
)

log = logging.getLogger(__name__)

Done = Callable[[ProbeResult], None]
CONNECTED = ProbeResult(True, None, None)
_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN)
_ADDRESS_CACHE_LIMIT = 4096


class _Exchange:
    """One probe (or connect check, when `request` is None) on a non-blocking socket."""

    __slots__ = ("done", "finished", "head", "reading", "request", "sock", "timeout")

    def __init__(self, sock: socket.socket, request: bytes | None, timeout: float, done: Done) -> None:
        self.sock = sock
        self.request = request
        self.head = b""
        self.timeout = timeout
        self.done = done
        self.reading = False  # the request is sent; the status line is awaited
        self.finished = False


class ProbeLoop:
    """Non-blocking probes on one selector. Every method but `wake` belongs to the thread
    that calls `poll`; callbacks run on it, and must not block."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._selector.register(self._wake_out, selectors.EVENT_READ, None)
        self._deadlines: list[tuple[float, int, _Exchange]] = []
        self._sequence = itertools.count()
        self._addresses: dict[tuple[str, int], tuple[socket.AddressFamily, tuple[str, int]]] = {}

    def probe(
        self, host: str, port: int, probe: ProbeConfig, done: Done, request: bytes | None = None
    ) -> None:
        """Run `probe` against host:port; `request`: its bytes, when the caller keeps them."""
        self._start(host, port, request or request_bytes(host, port, probe), probe.timeout, done)

    def connect(self, host: str, port: int, done: Done) -> None:
        self._start(host, port, None, CONNECT_TIMEOUT_SECONDS, done)

    def wake(self) -> None:
        """Make a `poll` under way return now; safe from any thread."""
        with contextlib.suppress(OSError):  # a wake-up is already pending, or the loop is closed
            self._wake_in.send(b"\0")

    def seconds_to_deadline(self) -> float | None:
        """Seconds until the earliest probe in flight times out; None when none is in flight."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].finished:
            heapq.heappop(deadlines)
        return deadlines[0][0] - monotonic() if deadlines else None

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for sockets to be ready, and move each one along."""
        for key, _mask in self._selector.select(max(timeout, 0.0)):
            exchange = key.data
            if exchange is None:
                self._drain_wakeups()
            else:
                self._step(exchange)
        now = monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, exchange = heapq.heappop(self._deadlines)
            if not exchange.finished:
                self._finish(exchange, timed_out(exchange.timeout))

    def close(self) -> None:
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                key.data.finished = True
                key.data.sock.close()
        self._selector.close()
        self._wake_in.close()
        self._wake_out.close()

    def _start(self, host: str, port: int, request: bytes | None, timeout: float, done: Done) -> None:
        try:
            family, address = self._address(host, port)
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            _tell(done, failure_of(exc, timeout))  # out of descriptors, say
            return
        sock.setblocking(False)
        exchange = _Exchange(sock, request, timeout, done)
        code = sock.connect_ex(address)
        if code not in _IN_PROGRESS and code != 0:
            self._finish(exchange, failure_of(OSError(code, os.strerror(code)), timeout), registered=False)
            return
        events = selectors.EVENT_WRITE
        if request is not None:
            # Over loopback the connection is usually made by the time connect_ex returns:
            # sending at once saves a round through the selector.
            try:
                exchange.request = request[sock.send(request) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                self._finish(exchange, failure_of(exc, timeout), registered=False)
                return
            if not exchange.request:
                exchange.reading = True
                events = selectors.EVENT_READ
        self._selector.register(sock, events, exchange)
        heapq.heappush(self._deadlines, (monotonic() + timeout, next(self._sequence), exchange))

    def _address(self, host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
        known = self._addresses.get((host, port))
        if known is None:
            if len(self._addresses) >= _ADDRESS_CACHE_LIMIT:
                self._addresses.clear()
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            known = self._addresses[(host, port)] = (family, (str(address[0]), int(address[1])))
        return known

    def _step(self, exchange: _Exchange) -> None:
        sock = exchange.sock
        try:
            if exchange.request is None:  # a connect check: writable means connected or failed
                self._finish(exchange, self._connect_outcome(sock, exchange.timeout))
                return
            if not exchange.reading:
                self._send(exchange)
                return
            chunk = sock.recv(STATUS_LINE_CAP_BYTES - len(exchange.head))
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(exchange, failure_of(exc, exchange.timeout))
            return
        exchange.head += chunk
        if not chunk or head_complete(exchange.head):
            self._finish(exchange, answer_of(exchange.head))

    def _send(self, exchange: _Exchange) -> None:
        """The socket is writable: connected (or failed); send what is left of the request."""
        outcome = self._connect_outcome(exchange.sock, exchange.timeout)
        if not outcome.ok:
            self._finish(exchange, outcome)
            return
        assert exchange.request is not None
        sent = exchange.sock.send(exchange.request)
        exchange.request = exchange.request[sent:]
        if not exchange.request:
            exchange.reading = True
            self._selector.modify(exchange.sock, selectors.EVENT_READ, exchange)

    @staticmethod
    def _connect_outcome(sock: socket.socket, timeout: float) -> ProbeResult:
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return CONNECTED if code == 0 else failure_of(OSError(code, os.strerror(code)), timeout)

    def _finish(self, exchange: _Exchange, result: ProbeResult, registered: bool = True) -> None:
        exchange.finished = True
        if registered:
            self._selector.unregister(exchange.sock)
        exchange.sock.close()
        _tell(exchange.done, result)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_out.recv(4096):
                pass


def _tell(done: Done, result: ProbeResult) -> None:
    try:
        done(result)
    except Exception:  # one probe's bookkeeping must not stop every other probe
        log.exception("recording a probe result failed")


class CallTransport:
    """Probes and connect checks through blocking functions, on a pool of `workers` threads."""

    def __init__(
        self,
        execute: Callable[[str, int, ProbeConfig], ProbeResult],
        connect: Callable[[str, int], bool],
        workers: int = 4,
    ) -> None:
        self._execute = execute
        self._connect = connect
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe")

    def probe(
        self, host: str, port: int, probe: ProbeConfig, done: Done, request: bytes | None = None
    ) -> None:
        self._pool.submit(lambda: done(self._execute(host, port, probe)))

    def connect(self, host: str, port: int, done: Done) -> None:
        def check() -> None:
            done(CONNECTED if self._connect(host, port) else ProbeResult(False, None, "refused"))

        self._pool.submit(check)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
