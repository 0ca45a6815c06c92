"""HTTP probes: what their results mean, and the runner that schedules them.

Semantics (dstack's, see the design notes): a 2xx response is a success and adds one to the
probe's streak; anything else (other status, redirect, refused, timeout) resets it to 0. A
probe is ready when streak >= ready_after; a replica when all its probes are. Each probe runs
`interval` after the previous one *ended*. Where we differ from dstack: once a replica is
ready it leaves rotation only after FAILURES_TO_LEAVE consecutive failures of one probe, and
comes back when every probe is ready again. A replica without probes is ready once a TCP
connection to its container's own address succeeds (the connect check, retried until it
does, soon at first and then every CONNECT_RETRY_SECONDS).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from dstackctl.config.probe_model import ProbeConfig
from dstackctl.probe_transport import CallTransport, Done, ProbeLoop
from dstackctl.probe_wire import PROXY_ANSWERS, ProbeResult, can_connect, execute_probe, request_bytes
from dstackctl.status import ProbeView
from dstackctl.timeutil import utc_now

FAILURES_TO_LEAVE = 3
# The connect check of a probe-less replica is retried after FIRST_CONNECT_RETRY_SECONDS,
# then twice as long each time up to CONNECT_RETRY_SECONDS: a replica that listens at once
# is ready at once, one that takes minutes costs a connection every 0.2 s.
FIRST_CONNECT_RETRY_SECONDS = 0.02
CONNECT_RETRY_SECONDS = 0.2
# The scheduler's index of a target's connect check (its probes are 0, 1, ...).
_CONNECT = -1
# The longest the runner's thread sleeps without looking at its stop flag.
_MAX_WAIT_SECONDS = 0.5


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
    requests: list[bytes]  # each probe's request, built once
    address: tuple[str, int] | None = None  # for the connect check of a probe-less replica
    inside: tuple[str, int] | None = None  # the container's own address and port
    connected: bool = False
    connect_retry: float = FIRST_CONNECT_RETRY_SECONDS
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
    """One finished probe or connect check, for measuring the runner: when it was due, began
    and ended, and its result."""

    key: str
    index: int
    due: float
    started: float
    ended: float
    result: ProbeResult


class ProbeRunner:
    """Runs every probe of every registered replica from one thread: a schedule of due
    probes, and the transport that carries them out (non-blocking sockets by default).

    `execute` and `connect` replace the sockets with blocking functions run on a pool of
    `workers` threads (tests script outcomes that way).
    """

    def __init__(
        self,
        on_change: Callable[[str], None] = lambda _key: None,
        on_sample: Callable[[ProbeSample], None] | None = None,
        execute: Callable[[str, int, ProbeConfig], ProbeResult] | None = None,
        connect: Callable[[str, int], bool] | None = None,
        workers: int = 4,
    ) -> None:
        self._execute = execute or execute_probe
        self._on_change = on_change
        self._on_sample = on_sample
        self._targets: dict[str, _Target] = {}
        self._heap: list[tuple[float, int, str, int, int]] = []
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loop = ProbeLoop()
        self._transport: ProbeLoop | CallTransport = self._loop
        if execute is not None or connect is not None:
            self._transport = CallTransport(self._execute, connect or can_connect, workers)
        self._thread = threading.Thread(target=self._run, name="probes", daemon=True)
        self._thread.start()

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
                requests=[request_bytes(host, port, p) for p in probes],
                statuses=_carried_over(statuses, carried if current is None else None),
                address=None if probes else (address or (host, port)),
                inside=address,
                generation=(current.generation + 1) if current else 0,
            )
            if carried is not None and current is None:
                target.connected = target.in_rotation = True
            self._targets[key] = target
        self._on_change(key)  # told of the registration before any result of it can arrive
        with self._lock:
            if self._targets.get(key) is not target:
                return
            now = time.monotonic()
            for index in range(len(probes)) if probes else [_CONNECT]:
                heapq.heappush(self._heap, (now, next(self._sequence), key, index, target.generation))
        self._loop.wake()

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
        """Stop probing; probes in flight are abandoned."""
        self._stop.set()
        self._loop.wake()
        self._thread.join(timeout)
        if isinstance(self._transport, CallTransport):
            self._transport.close()

    # --- the runner's thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                wait = self._start_due()
                in_flight = self._loop.seconds_to_deadline()
                self._loop.poll(min(wait, in_flight) if in_flight is not None else wait)
        finally:
            self._loop.close()

    def _start_due(self) -> float:
        """Start every probe that is due; returns the seconds until the next one is."""
        due_now: list[tuple[_Target, int, float]] = []
        with self._lock:
            now = time.monotonic()
            heap = self._heap
            while heap and heap[0][0] <= now:
                due, _, key, index, generation = heapq.heappop(heap)
                target = self._targets.get(key)
                if target is not None and target.generation == generation:
                    due_now.append((target, index, due))
            wait = min(heap[0][0] - now, _MAX_WAIT_SECONDS) if heap else _MAX_WAIT_SECONDS
        for target, index, due in due_now:
            self._begin(target, index, due)
        return wait

    def _begin(self, target: _Target, index: int, due: float) -> None:
        started = time.monotonic()
        if index == _CONNECT:
            assert target.address is not None
            done = self._finisher(target, index, due, started, self._connected)
            self._transport.connect(*target.address, done)
            return
        finish = self._finisher(target, index, due, started, self._probed)
        if target.inside is None:
            self._transport.probe(
                target.host, target.port, target.probes[index], finish, target.requests[index]
            )
            return
        inside = target.inside

        def check_behind_proxy(result: ProbeResult) -> None:
            if result.error not in PROXY_ANSWERS:
                finish(result)
                return
            # Docker's proxy took the connection; does anything listen behind it?
            nothing = ProbeResult(
                False, None, f"nothing answers on port {inside[1]} inside the container; check `port:`"
            )
            self._transport.connect(*inside, lambda behind: finish(result if behind.ok else nothing))

        probe, request = target.probes[index], target.requests[index]
        self._transport.probe(target.host, target.port, probe, check_behind_proxy, request)

    def _finisher(
        self,
        target: _Target,
        index: int,
        due: float,
        started: float,
        record: Callable[[_Target, int, ProbeResult], None],
    ) -> Done:
        def finish(result: ProbeResult) -> None:
            if self._stop.is_set():
                return
            if self._on_sample is not None:
                self._on_sample(ProbeSample(target.key, index, due, started, time.monotonic(), result))
            record(target, index, result)

        return finish

    def _probed(self, target: _Target, index: int, result: ProbeResult) -> None:
        probe = target.probes[index]
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

    def _connected(self, target: _Target, index: int, result: ProbeResult) -> None:
        if not result.ok:
            self._schedule_next(target, _CONNECT, target.connect_retry)
            target.connect_retry = min(2 * target.connect_retry, CONNECT_RETRY_SECONDS)
            return
        with target.lock:
            target.connected = True
            target.update_rotation()
        self._on_change(target.key)  # connected once is enough: exits are Docker's to report

    def _schedule_next(self, target: _Target, index: int, interval: float) -> None:
        with self._lock:
            if self._targets.get(target.key) is not target:
                return
            entry = (time.monotonic() + interval, next(self._sequence), target.key, index, target.generation)
            heapq.heappush(self._heap, entry)
            earliest = self._heap[0] is entry
        # The runner's own thread looks at the schedule before it waits again; any other
        # thread must wake it when the earliest deadline moved.
        if earliest and threading.get_ident() != self._thread.ident:
            self._loop.wake()
