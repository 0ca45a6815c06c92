"""The agent's supervisor: a small parent that restarts the agent when it dies or hangs.

    CLI `run` --(fork or spawn)--> supervisor --(fork)--> agent: reconcile loop, probes, endpoint
                                       ^---- socketpair: heartbeats, the endpoint's listening socket

The supervisor holds the service's agent lock, so no second agent can start while one is being
restarted, and a duplicate of the endpoint's listening socket, which every new agent inherits:
between two agents, clients wait in the socket's backlog instead of being refused. It starts no
thread (it forks), and it forks from a process that has imported the agent's modules already, so
a restart costs milliseconds. An agent that exits 0 was stopped (SIGTERM, or its service is no
longer wanted) and the supervisor exits with it; any other end is restarted at once, and again
with a growing delay while restarts keep failing fast. An agent that sends no heartbeat for
HANG_SECONDS (stopped with SIGSTOP, a wedged endpoint loop) is killed and restarted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("dstackctl.agent")

HEARTBEAT_SECONDS = 0.5
HANG_SECONDS = 5.0
# An agent that ends sooner than this failed quickly; after two quick failures in a row the
# restarts back off (a crash at start-up must not spin). Killed later, it restarts at once.
HEALTHY_LIFE_SECONDS = 2.0
# Once an agent has run this long, the supervisor imports what the agent loads late (the
# endpoint's aiohttp), so that the agents it forks later start serving sooner.
WARM_UP_AFTER_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 30.0
_BEAT = b"beat"
_LISTENER = b"listener"


class SupervisorLink:
    """The agent's end of the socketpair: heartbeats and the endpoint's listening socket."""

    def __init__(self, sock: socket.socket, inherited: socket.socket | None) -> None:
        self._sock = sock
        self.inherited = inherited  # the listener of the agent before this one, if any
        self.lost = False

    def beat(self) -> None:
        self._send([_BEAT])

    def keep_listener(self, listener: socket.socket) -> None:
        """Give the supervisor a duplicate of the endpoint's listener, for the next agent."""
        self._send([_LISTENER], listener.fileno())

    def _send(self, parts: list[bytes], fd: int | None = None) -> None:
        if self.lost:
            return
        try:
            if fd is None:
                self._sock.send(b" ".join(parts))
            else:
                socket.send_fds(self._sock, parts, [fd])
        except OSError:
            self.lost = True
            log.warning("the agent's supervisor is gone; this agent carries on unsupervised")


@dataclass
class _Child:
    pid: int
    sock: socket.socket
    started: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic)
    told: bool = False  # SIGTERM forwarded to it


class Supervisor:
    """Runs `run_agent(link)` in a forked child and restarts it until it exits 0 or is stopped."""

    def __init__(
        self, run_agent: Callable[[SupervisorLink], int], warm_up: Callable[[], None] = lambda: None
    ) -> None:
        self._run_agent = run_agent
        self._warm_up: Callable[[], None] | None = warm_up
        self._listener: socket.socket | None = None
        self._stopping = False
        self._child: _Child | None = None
        self._quick_failures = 0

    def run(self, on_agent: Callable[[int], None] = lambda _pid: None) -> int:
        """Supervise until the agent exits 0; `on_agent` is told each new agent's pid."""
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        while True:
            child = self._start()
            try:
                on_agent(child.pid)
            except OSError as exc:  # the store's folder is gone or read-only: supervise anyway
                log.warning("cannot record agent pid %d: %s", child.pid, exc)
            status = self._watch(child)
            self._child = None
            child.sock.close()
            code = os.waitstatus_to_exitcode(status)
            if code == 0 or self._stopping:
                return 0
            life = time.monotonic() - child.started
            self._quick_failures = 0 if life >= HEALTHY_LIFE_SECONDS else self._quick_failures + 1
            delay = _backoff(self._quick_failures)
            log.error("agent pid %d %s after %.1f s; %s", child.pid, _ended(code), life, _restart(delay))
            if delay and self._sleep(delay):
                return 0

    def _start(self) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the agent
            code = 1
            try:
                ours.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = self._run_agent(SupervisorLink(theirs, self._listener))
            except BaseException:
                log.exception("agent crashed")
            finally:
                os._exit(code)
        theirs.close()
        self._child = _Child(pid, ours)
        return self._child

    def _watch(self, child: _Child) -> int:
        """Read the agent's messages until it ends; kill it when it hangs. Returns its status."""
        looked = time.monotonic()
        while True:
            ended, status = os.waitpid(child.pid, os.WNOHANG)
            if ended:
                return status
            if self._stopping and not child.told:  # a stop that came before it was known
                child.told = True
                _kill(child.pid, signal.SIGTERM)
            now = time.monotonic()
            if now - looked > max(HANG_SECONDS / 2, 2 * HEARTBEAT_SECONDS):  # itself stopped: no verdict
                child.last_beat = now
            looked = now
            warm_up = self._warm_up
            if warm_up is not None and time.monotonic() - child.started > WARM_UP_AFTER_SECONDS:
                self._warm_up = None
                warm_up()
            if time.monotonic() - child.last_beat > HANG_SECONDS:
                log.error("agent pid %d sent no heartbeat for %.0f s; killing it", child.pid, HANG_SECONDS)
                _kill(child.pid, signal.SIGKILL)
                return os.waitpid(child.pid, 0)[1]
            try:
                readable, _, _ = select.select([child.sock], [], [], HEARTBEAT_SECONDS)
            except InterruptedError:
                continue
            if readable and not self._receive(child):
                return os.waitpid(child.pid, 0)[1]  # its end closed: it is exiting or gone

    def _receive(self, child: _Child) -> bool:
        """Take one message; False when the agent's end of the pair is closed."""
        try:
            message, fds, _flags, _addr = socket.recv_fds(child.sock, 64, 1)
        except OSError:
            return False
        if not message and not fds:
            return False
        child.last_beat = time.monotonic()
        if message.startswith(_LISTENER) and fds:
            if self._listener is not None:
                self._listener.close()
            self._listener = socket.socket(fileno=fds[0])
        else:
            for fd in fds:
                os.close(fd)
        return True

    def _forward(self, signum: int, _frame: object) -> None:
        self._stopping = True
        if self._child is not None:
            self._child.told = True
            _kill(self._child.pid, signum)

    def _sleep(self, seconds: float) -> bool:
        """Wait before a restart; True when a stop came meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, deadline - time.monotonic()))
        return self._stopping


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _backoff(quick_failures: int) -> float:
    """No wait after one or two quick failures; then 1 s, 2 s, 4 s ... up to MAX_BACKOFF_SECONDS."""
    return min(MAX_BACKOFF_SECONDS, 2.0 ** (quick_failures - 3)) if quick_failures > 2 else 0.0


def _ended(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _restart(delay: float) -> str:
    return f"restarting it in {delay:.1f} s (it keeps failing)" if delay else "restarting it"
