"""HTTP probes: one request per check, and a scheduler with a bounded pool of workers.

Semantics (dstack's, see the design notes): a 2xx response is a success and adds one to the
probe's streak; anything else (other status, redirect, refused, timeout) resets it to 0. A
probe is ready when streak >= ready_after; a replica when all its probes are. Each probe runs
`interval` after the previous one *ended*. Where we differ from dstack: once a replica is
ready it leaves rotation only after FAILURES_TO_LEAVE consecutive failures of one probe, and
comes back when every probe is ready again. A replica without probes is ready once a TCP
connection to its container's own address succeeds (the connect check, retried every
CONNECT_RETRY_SECONDS until it does).
"""

from __future__ import annotations

import heapq
import itertools
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from urllib.parse import quote

from dstackctl import __version__
from dstackctl.config.probe_model import ProbeConfig
from dstackctl.status import ProbeView
from dstackctl.timeutil import utc_now

USER_AGENT = f"dstackctl/{__version__}"
# Only the status line is read; anything after the first 8 KiB is never looked at.
STATUS_LINE_CAP_BYTES = 8 * 1024
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})")
FAILURES_TO_LEAVE = 3
DEFAULT_WORKERS = 32
CONNECT_RETRY_SECONDS = 0.2
CONNECT_TIMEOUT_SECONDS = 2.0
# The scheduler's index of a target's connect check (its probes are 0, 1, ...).
_CONNECT = -1


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    status: int | None
    error: str | None


def request_bytes(host: str, port: int, probe: ProbeConfig) -> bytes:
    """The whole HTTP/1.1 request of a probe; header values cannot smuggle a line break."""
    url = quote(probe.url, safe="/?&=%:+,;@!$'()*~#[]-._")
    lines = [
        f"{probe.method.upper()} {url} HTTP/1.1",
        f"Host: {host}:{port}",
        f"User-Agent: {USER_AGENT}",
        "Connection: close",
    ]
    lines += [f"{h.name}: {_one_line(h.value)}" for h in probe.headers]
    body = probe.body.encode() if probe.body is not None else b""
    if probe.body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


NO_RESPONSE = "closed the connection without a response"
# What Docker's userland proxy does when nothing listens behind a published port (it varies).
_PROXY_ANSWERS = (NO_RESPONSE, "connection reset")


def execute_probe(host: str, port: int, probe: ProbeConfig) -> ProbeResult:
    """Send one probe request and read its status line; never raises, never follows redirects.

    A plain socket rather than http.client: a probe needs the status code only, and parsing
    the headers with http.client cost about half of the runner's CPU at 1000 probes/s.
    """
    deadline = time.monotonic() + probe.timeout
    try:
        with socket.create_connection((host, port), timeout=probe.timeout) as sock:
            sock.sendall(request_bytes(host, port, probe))
            head = b""
            while b"\n" not in head and len(head) < STATUS_LINE_CAP_BYTES:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(STATUS_LINE_CAP_BYTES - len(head))
                if not chunk:
                    break
                head += chunk
    except ConnectionRefusedError:
        return ProbeResult(False, None, "connection refused")
    except TimeoutError:
        return ProbeResult(False, None, f"timed out after {probe.timeout}s")
    except ConnectionResetError:
        return ProbeResult(False, None, "connection reset")
    except OSError as exc:
        return ProbeResult(False, None, f"{type(exc).__name__}: {exc.strerror or exc}"[:200])
    if not head:
        return ProbeResult(False, None, NO_RESPONSE)
    match = _STATUS_LINE.match(head)
    if match is None:
        return ProbeResult(False, None, "answered with something that is not HTTP")
    status = int(match.group(1))
    if 200 <= status < 300:
        return ProbeResult(True, status, None)
    return ProbeResult(False, status, f"HTTP {status}")


def can_connect(host: str, port: int) -> bool:
    """True when a TCP connection to host:port succeeds: something listens there."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def recorded(probe: ProbeView, result: ProbeResult) -> ProbeView:
    """`probe` after one more check: a success adds to the streak, a failure resets it."""
    if result.ok:
        streaks = {"success_streak": probe.success_streak + 1, "failure_streak": 0}
    else:
        streaks = {"success_streak": 0, "failure_streak": probe.failure_streak + 1}
    return ProbeView(
        url=probe.url,
        ready_after=probe.ready_after,
        last_checked_at=utc_now(),
        last_error=None if result.ok else result.error,
        last_status=result.status,
        **streaks,
    )


@dataclass
class _Target:
    key: str
    host: str
    port: int
    probes: list[ProbeConfig]
    statuses: list[ProbeView]
    address: tuple[str, int] | None = None  # for the connect check of a probe-less replica
    inside: tuple[str, int] | None = None  # the container's own address and port
    connected: bool = False
    in_rotation: bool = False
    generation: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update_rotation(self) -> bool:
        """Recompute readiness; returns True when it changed."""
        before = self.in_rotation
        if not self.statuses:
            self.in_rotation = self.connected
        elif all(s.ready for s in self.statuses):
            self.in_rotation = True
        elif self.in_rotation and any(s.failure_streak >= FAILURES_TO_LEAVE for s in self.statuses):
            self.in_rotation = False
        return before != self.in_rotation


def _carried_over(fresh: list[ProbeView], carried: tuple[ProbeView, ...] | None) -> list[ProbeView]:
    """The probe views a restarted agent starts from: those carried, where they still match."""
    if carried is None:
        return fresh
    if [(p.url, p.ready_after) for p in carried] != [(p.url, p.ready_after) for p in fresh]:
        return [replace(p, success_streak=p.ready_after) for p in fresh]
    return list(carried)


@dataclass(frozen=True)
class ProbeSample:
    """One executed probe, for measuring the scheduler: when it was due and when it began."""

    key: str
    index: int
    due: float
    started: float


class ProbeRunner:
    """Runs every probe of every registered replica on a shared scheduler and worker pool."""

    def __init__(
        self,
        workers: int = DEFAULT_WORKERS,
        on_change: Callable[[str], None] = lambda _key: None,
        execute: Callable[[str, int, ProbeConfig], ProbeResult] = execute_probe,
        on_sample: Callable[[ProbeSample], None] | None = None,
        connect: Callable[[str, int], bool] = can_connect,
    ) -> None:
        self._execute = execute
        self._connect = connect
        self._on_change = on_change
        self._on_sample = on_sample
        self._targets: dict[str, _Target] = {}
        self._heap: list[tuple[float, int, str, int, int]] = []
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe")
        self._scheduler = threading.Thread(target=self._schedule, name="probe-scheduler", daemon=True)
        self._scheduler.start()

    # --- registration -------------------------------------------------------------------

    def watch(
        self,
        key: str,
        host: str,
        port: int,
        probes: list[ProbeConfig],
        urls: list[str] | None = None,
        address: tuple[str, int] | None = None,
        carried: tuple[ProbeView, ...] | None = None,
    ) -> None:
        """Start probing a replica now (no initial delay). Re-watching with the same port is a no-op.

        `urls` are the probe URLs to report (as written, before `${{ env.X }}` was expanded).
        Without probes, the replica is ready once a connection to `address` (the container's
        own IP and port; default host:port) succeeds. `carried`: the probe views of a replica
        that a previous agent had in rotation; it starts in rotation with them.
        """
        with self._lock:
            current = self._targets.get(key)
            if current is not None and current.port == port:
                return
            shown = urls or [p.url for p in probes]
            statuses = [ProbeView(url, p.ready_after) for p, url in zip(probes, shown, strict=True)]
            target = _Target(
                key=key,
                host=host,
                port=port,
                probes=probes,
                statuses=_carried_over(statuses, carried if current is None else None),
                address=None if probes else (address or (host, port)),
                inside=address,
                generation=(current.generation + 1) if current else 0,
            )
            if carried is not None and current is None:
                target.connected = target.in_rotation = True
            self._targets[key] = target
            now = time.monotonic()
            for index in range(len(probes)) if probes else [_CONNECT]:
                heapq.heappush(self._heap, (now, next(self._sequence), key, index, target.generation))
            self._wakeup.notify()
        self._on_change(key)

    def forget(self, key: str) -> None:
        with self._lock:
            self._targets.pop(key, None)

    def watched(self) -> list[str]:
        with self._lock:
            return list(self._targets)

    def snapshot(self, key: str) -> tuple[bool, tuple[ProbeView, ...]] | None:
        """(in rotation, each probe's view); None for a replica that is not watched."""
        with self._lock:
            target = self._targets.get(key)
        if target is None:
            return None
        with target.lock:
            return target.in_rotation, tuple(target.statuses)

    def check_now(self, key: str) -> str | None:
        """Run the replica's probes once, now, outside the schedule and its streaks: the first
        failure's error, or None (all passed, it has no probes, or it is not watched)."""
        with self._lock:
            target = self._targets.get(key)
        if target is None:
            return None
        for probe in target.probes:
            result = self._execute(target.host, target.port, probe)
            if not result.ok:
                return f"probe {probe.url} failed: {result.error}"
        return None

    def views(self, key: str) -> tuple[ProbeView, ...] | None:
        """Each probe's view of a watched replica; None for one that is not watched."""
        snapshot = self.snapshot(key)
        return snapshot[1] if snapshot else None

    def close(self, timeout: float = 1.0) -> None:
        """Stop scheduling; running probes are abandoned (their threads end with their timeout)."""
        self._stop.set()
        with self._lock:
            self._wakeup.notify_all()
        self._scheduler.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- scheduling ---------------------------------------------------------------------

    def _schedule(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._heap:
                    self._wakeup.wait(0.5)
                    continue
                due, _, key, index, generation = self._heap[0]
                delay = due - time.monotonic()
                if delay > 0:
                    self._wakeup.wait(min(delay, 0.5))
                    continue
                heapq.heappop(self._heap)
                target = self._targets.get(key)
                if target is None or target.generation != generation:
                    continue
            self._pool.submit(self._probe, target, index, due)

    def _probe(self, target: _Target, index: int, due: float) -> None:
        if self._stop.is_set():
            return
        started = time.monotonic()
        if self._on_sample is not None:
            self._on_sample(ProbeSample(target.key, index, due, started))
        if index == _CONNECT:
            self._check_connect(target)
            return
        probe = target.probes[index]
        result = self._execute(target.host, target.port, probe)
        if result.error in _PROXY_ANSWERS and target.inside and not self._connect(*target.inside):
            # Docker's proxy took the connection, but nothing listens behind it.
            result = ProbeResult(
                False, None, f"nothing answers on port {target.inside[1]} inside the container; check `port:`"
            )
        with target.lock:
            previous, was_in_rotation = target.statuses[index], target.in_rotation
            status = target.statuses[index] = recorded(previous, result)
            target.update_rotation()
            shown_before = (previous.symbol, previous.last_error, was_in_rotation)
            changed = shown_before != (status.symbol, status.last_error, target.in_rotation)
            stop_probing = probe.until_ready and status.ready
        if changed:
            self._on_change(target.key)
        if not stop_probing:
            self._schedule_next(target, index, probe.interval)

    def _check_connect(self, target: _Target) -> None:
        assert target.address is not None
        if not self._connect(*target.address):
            self._schedule_next(target, _CONNECT, CONNECT_RETRY_SECONDS)
            return
        with target.lock:
            target.connected = True
            target.update_rotation()
        self._on_change(target.key)  # connected once is enough: exits are Docker's to report

    def _schedule_next(self, target: _Target, index: int, interval: float) -> None:
        with self._lock:
            if self._targets.get(target.key) is target:
                entry = (
                    time.monotonic() + interval,
                    next(self._sequence),
                    target.key,
                    index,
                    target.generation,
                )
                heapq.heappush(self._heap, entry)
                if self._heap[0] is entry:  # only a new earliest deadline changes the scheduler's wait
                    self._wakeup.notify()
