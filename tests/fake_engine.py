"""A stateful fake of the Docker engine the service agent uses, for Docker-free tests.

Each container the fake "creates" is backed by a real TCP socket on 127.0.0.1 with an
ephemeral port, so the agent's real ProbeRunner (and endpoint) reach it over HTTP:
`host_port` is that port, and so is `container_port`, with `ip_address` 127.0.0.1, so a
connection to the container's own address reaches the same socket.

What a container does is scripted by a behaviour, taken from `FakeEngine.script[(replica_num,
deployment_num)]` when set, else from the `FAKE_BEHAVIOUR` variable of the ReplicaSpec's
environment (a test puts it in the service's `env`), else `serve`:

- `serve`: answers 200 on every path;
- `exit:N`: `create_and_start` returns it running (as Docker may), but it has exited with code
  N by the first time it is listed or inspected; nothing ever listens;
- `exit:N@S`: runs S seconds (Docker lists it running), listening to nothing, then exits with N;
- `crash_after:S`: serves for S seconds, then exits with code 1 and stops listening;
- `hang_after:S`: serves for S seconds, then accepts connections but never answers;
- `no_listen`: runs, but nothing listens: connections are refused;
- `slow_start:S`: runs, and listens only after S seconds.

A comma-separated list (`hang_after:2,serve`) gives the 1st, 2nd, ... container of the same
(replica_num, deployment_num) its own behaviour; the last one repeats.

Every call is recorded in `calls` (`("create", spec)`, `("start", id)`, `("stop", id)`, ...).
`outage()` (or `go_down()` / `come_back()`) makes every call raise DockerError as a stopped
Docker does; optionally it stops the running containers, as a Docker restart does.
`shutdown()` closes every socket and joins every thread the fake started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import secrets
import select
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from dstackctl.docker import DockerEngine, DockerError
from dstackctl.labels import LABEL_DEPLOYMENT, LABEL_REPLICA, LABEL_RUN
from dstackctl.replica import Replica
from dstackctl.replica_spec import ReplicaSpec

BEHAVIOUR_VARIABLE = "FAKE_BEHAVIOUR"
DOCKER_DOWN = (
    "Docker is not running (cannot reach its socket); start it with "
    "`sudo systemctl start docker` or `sudo dockerd &`"
)
# What a container stopped by a Docker restart exits with (SIGTERM).
SIGTERM_EXIT_CODE = 143
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
)


def make_replica(
    *,
    id: str,
    name: str,
    labels: dict[str, str],
    status: str,
    exit_code: int | None = None,
    oom_killed: bool = False,
    host_port: int | None = None,
    started_at: str | None = None,
    finished_at: str | None = None,
    ip_address: str | None = None,
    container_port: int | None = None,
) -> Replica:
    """The one place that builds a Replica: fields are taken from the dataclass, so this works
    with today's (`finished_at`, `error`) and the refactor's (`ip_address`, `container_port`);
    a field this does not know is None."""
    values: dict[str, Any] = {
        "id": id,
        "name": name,
        "labels": dict(labels),
        "status": status,
        "exit_code": exit_code,
        "oom_killed": oom_killed,
        "host_port": host_port,
        "started_at": started_at,
        "finished_at": finished_at,
        "error": None,
        "ip_address": ip_address,
        "container_port": container_port,
    }
    return Replica(**{f.name: values.get(f.name) for f in dataclasses.fields(Replica)})


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Behaviour:
    kind: str
    value: float = 0.0
    delay: float = 0.0  # `exit:N@S`: the seconds it runs (listening to nothing) before it exits

    KINDS = ("serve", "exit", "crash_after", "hang_after", "no_listen", "slow_start")

    @classmethod
    def parse(cls, text: str) -> Behaviour:
        spec, _, delay = text.strip().partition("@")
        kind, _, value = spec.partition(":")
        if (
            kind not in cls.KINDS
            or bool(value) != (kind not in ("serve", "no_listen"))
            or (delay and kind != "exit")
        ):
            raise ValueError(f"unknown fake behaviour {text!r}")
        return cls(kind, float(value) if value else 0.0, float(delay) if delay else 0.0)

    @property
    def exits_at_once(self) -> bool:
        return self.kind == "exit" and self.delay == 0

    def __str__(self) -> str:
        if self.kind in ("serve", "no_listen"):
            return self.kind
        return f"{self.kind}:{self.value:g}" + (f"@{self.delay:g}" if self.delay else "")


class FakeServer:
    """What the network sees of a replica's process: a socket bound to 127.0.0.1:<ephemeral>.

    Bound but not listening, it refuses connections (`no_listen`, before `slow_start`);
    listening, it answers 200 to every request or, once `hang()` was called, reads requests
    and never answers. `close()` frees the port, drops every connection and joins its threads.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.hanging = False
        self.requests = 0
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._accepter: threading.Thread | None = None
        self._handlers: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()

    def listen(self) -> None:
        with self._lock:
            if self._closed.is_set() or self._accepter is not None:
                return
            self._sock.listen(64)
            self._accepter = threading.Thread(
                target=self._accept_loop, name=f"fake-accept-{self.label}", daemon=True
            )
            self._accepter.start()

    def hang(self) -> None:
        self.hanging = True

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            accepter = self._accepter
        if accepter is not None and accepter is not threading.current_thread():
            accepter.join(5)  # it polls `_closed` every 0.05 s; the socket is closed after it
        self._sock.close()
        with self._lock:
            handlers, self._handlers = self._handlers, []
            connections, self._connections = self._connections, set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv
            with contextlib.suppress(OSError):
                conn.close()
        for thread in handlers:
            thread.join(5)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            readable, _, _ = select.select([self._sock], [], [], 0.05)
            if not readable:
                continue
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            thread = threading.Thread(
                target=self._handle, args=(conn,), name=f"fake-conn-{self.label}", daemon=True
            )
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._handlers = [t for t in self._handlers if t.is_alive()]
                self._handlers.append(thread)
                self._connections.add(conn)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(2.0)
            request = _read_request(conn)
            if request is None:
                return
            self.requests += 1
            if self.hanging:
                return  # never answered: the connection stays open until close()
            conn.sendall(_RESPONSE)
            self._drop(conn)
        except OSError:
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)
        with contextlib.suppress(OSError):
            conn.close()


def _read_request(conn: socket.socket) -> bytes | None:
    """One HTTP request (head and Content-Length body); None when the peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value.strip() or 0)
    while len(body) < length:
        chunk = conn.recv(4096)
        if not chunk:
            break
        body += chunk
    return head


@dataclass
class FakeContainer:
    id: str
    name: str
    labels: dict[str, str]
    environment: dict[str, str]
    behaviour: Behaviour
    spec: Any
    status: str = "created"
    exit_code: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    server: FakeServer | None = None
    last_port: int | None = None
    generation: int = 0
    timers: list[threading.Timer] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @property
    def replica_num(self) -> int:
        return int(self.labels.get(LABEL_REPLICA, "-1"))

    @property
    def deployment_num(self) -> int:
        return int(self.labels.get(LABEL_DEPLOYMENT, "0"))


class FakeEngine:
    """Stands in for DockerEngine (same methods), with containers that are local sockets."""

    def __init__(self) -> None:
        self.script: dict[tuple[int, int], str] = {}
        self.calls: list[tuple[str, Any]] = []
        self.down = False
        self.networks: set[str] = set()
        self.peak_running: dict[str, int] = {}  # by the service's run label
        self._containers: dict[str, FakeContainer] = {}
        self._removed: list[FakeContainer] = []
        self._sequence: dict[tuple[int, int], itertools.count[int]] = {}
        self._lock = threading.RLock()

    # --- test controls ------------------------------------------------------------------

    def connect(self) -> FakeEngine:
        """What `DockerEngine.connect()` returns while patched to this fake."""
        self._check()
        self._record("connect", None)
        return self

    def patch_connect(self, monkeypatch: Any) -> None:
        """Make `DockerEngine.connect()` (an agent reconnecting after an outage) return this
        fake, or raise while it is down; nothing in the test reaches a real Docker."""

        def connect(_cls: type, timeout: int = 30) -> FakeEngine:
            return self.connect()

        monkeypatch.setattr(DockerEngine, "connect", classmethod(connect))

    def go_down(self, stop_containers: bool = True) -> None:
        """Docker stops: every call raises; with `stop_containers`, the running containers
        exit (code 143) as they do when Docker restarts."""
        with self._lock:
            self.down = True
            if stop_containers:
                for container in self._containers.values():
                    if container.status in ("running", "paused"):
                        container.log.append("fake: stopped by Docker going down")
                        self._exit(container, SIGTERM_EXIT_CODE)

    def come_back(self) -> None:
        with self._lock:
            self.down = False

    @contextlib.contextmanager
    def outage(self, stop_containers: bool = True) -> Iterator[None]:
        self.go_down(stop_containers)
        try:
            yield
        finally:
            self.come_back()

    def shutdown(self) -> list[threading.Thread]:
        """Close every socket and join every thread this fake started; returns the fake's
        threads still alive after that (a leak: every one of them is named `fake-...`)."""
        with self._lock:
            containers = [*self._containers.values(), *self._removed]
            self._containers.clear()
            self._removed.clear()
        for container in containers:
            self._stop_process(container, join=True)
        return [t for t in threading.enumerate() if t.name.startswith("fake-") and t.is_alive()]

    # --- what tests read ----------------------------------------------------------------

    def calls_of(self, kind: str) -> list[Any]:
        with self._lock:
            return [argument for name, argument in self.calls if name == kind]

    def created(self, deployment_num: int | None = None) -> list[Any]:
        """ReplicaSpecs of the successful create_and_start calls (of one deployment)."""
        specs = self.calls_of("create")
        if deployment_num is None:
            return specs
        return [s for s in specs if s.labels.get(LABEL_DEPLOYMENT) == str(deployment_num)]

    def created_ids(self, deployment_num: int | None = None) -> list[str]:
        with self._lock:
            return [
                cid
                for cid, spec in self.calls_of("created_id")
                if deployment_num is None or spec.labels.get(LABEL_DEPLOYMENT) == str(deployment_num)
            ]

    def stopped(self) -> list[str]:
        return list(self.calls_of("stop"))

    def started(self) -> list[str]:
        return list(self.calls_of("start"))

    def container(self, container_id: str) -> FakeContainer | None:
        with self._lock:
            return self._containers.get(container_id)

    def list_count(self) -> int:
        return len(self.calls_of("list"))

    # --- the engine's interface ---------------------------------------------------------

    def close(self) -> None:
        """A client's close: never raises (the agent calls it on a lost engine)."""
        self._record("close", None)

    def ping(self) -> None:
        self._check()

    def list_replicas(self, labels: dict[str, str]) -> list[Replica]:
        self._check()
        with self._lock:
            self._record("list", dict(labels))
            return [
                self._snapshot(c)
                for c in self._containers.values()
                if all(c.labels.get(k) == v for k, v in labels.items())
            ]

    def ensure_network(self, name: str, labels: dict[str, str]) -> None:
        self._check()
        self.networks.add(name)

    def remove_networks(self, labels: dict[str, str]) -> int:
        removed = len(self.networks)
        self.networks.clear()
        return removed

    def gpus_in_use(self) -> set[str]:
        self._check()
        return set()

    def has_image(self, image: str) -> bool:
        self._check()
        return True

    def pull(
        self,
        image: str,
        progress: Callable[[str], None] = lambda _: None,
        auth: dict[str, str] | None = None,
    ) -> None:
        self._check()
        self._record("pull", image)

    def create_and_start(self, spec: ReplicaSpec) -> Replica:
        self._check()
        with self._lock:
            labels = dict(spec.labels)
            container = FakeContainer(
                id=secrets.token_hex(32),
                name=spec.name,
                labels=labels,
                environment=dict(spec.environment),
                behaviour=self._behaviour_for(labels, dict(spec.environment)),
                spec=spec,
            )
            self._containers[container.id] = container
            self._record("create", spec)
            self._record("created_id", (container.id, spec))
            self._run(container)
            snapshot = self._snapshot(container)  # what Docker said at start: running
            if container.behaviour.exits_at_once:
                self._exit(container, int(container.behaviour.value))
            run = labels.get(LABEL_RUN, "")
            running = sum(
                1
                for c in self._containers.values()
                if c.labels.get(LABEL_RUN) == run and c.status == "running"
            )
            self.peak_running[run] = max(self.peak_running.get(run, 0), running)
            return snapshot

    def start(self, container_id: str) -> None:
        self._check()
        with self._lock:
            container = self._containers.get(container_id)
            if container is None:
                raise DockerError(f"container {container_id[:12]} no longer exists")
            self._record("start", container_id)
            if container.status in ("running", "paused"):
                return
            self._run(container)
            if container.behaviour.exits_at_once:
                self._exit(container, int(container.behaviour.value))

    def inspect(self, container_id: str) -> Replica:
        self._check()
        with self._lock:
            container = self._containers.get(container_id)
            if container is None:
                raise DockerError(f"container {container_id[:12]} no longer exists")
            return self._snapshot(container)

    def stop_and_remove(self, container_id: str, grace_seconds: int) -> None:
        self._check()
        with self._lock:
            self._record("stop", container_id)
            container = self._containers.pop(container_id, None)
            if container is None:
                return  # gone is fine
            if container.status in ("running", "paused"):
                self._exit(container, SIGTERM_EXIT_CODE)
            self._removed.append(container)

    def tail_text(self, container_id: str, lines: int) -> list[str]:
        if self.down:
            return []  # as DockerEngine.tail_text: no text rather than an error
        with self._lock:
            container = self._containers.get(container_id)
            return list(container.log[-lines:]) if container else []

    def environment(self, container_id: str) -> dict[str, str]:
        self._check()
        with self._lock:
            container = self._containers.get(container_id)
            if container is None:
                raise DockerError(f"cannot inspect container {container_id[:12]}: no such container")
            return dict(container.environment)

    def logs(
        self,
        container_id: str,
        tail: int | None = None,
        follow: bool = False,
        stop: threading.Event | None = None,
        timestamps: bool = False,
        since: float | None = None,
    ) -> Iterator[bytes]:
        """What the container printed so far (a fake does not follow: the stream ends)."""
        self._check()
        with self._lock:
            container = self._containers.get(container_id)
            lines = list(container.log) if container else []
        if tail is not None:
            lines = lines[-tail:] if tail else []
        stamp = "2026-01-01T00:00:00.000000000Z " if timestamps else ""
        for line in lines:
            yield f"{stamp}{line}\n".encode()

    # --- inside the fake ----------------------------------------------------------------

    def _check(self) -> None:
        if self.down:
            raise DockerError(DOCKER_DOWN)

    def _record(self, kind: str, argument: Any) -> None:
        with self._lock:
            self.calls.append((kind, argument))

    def _behaviour_for(self, labels: dict[str, str], environment: dict[str, str]) -> Behaviour:
        key = (int(labels.get(LABEL_REPLICA, "-1")), int(labels.get(LABEL_DEPLOYMENT, "0")))
        text = self.script.get(key) or environment.get(BEHAVIOUR_VARIABLE) or "serve"
        choices = [Behaviour.parse(part) for part in text.split(",")]
        index = next(self._sequence.setdefault(key, itertools.count()))
        return choices[min(index, len(choices) - 1)]

    def _snapshot(self, container: FakeContainer) -> Replica:
        live = container.status in ("running", "paused")
        return make_replica(
            id=container.id,
            name=container.name,
            labels=container.labels,
            status=container.status,
            exit_code=container.exit_code if container.status in ("exited", "dead") else None,
            host_port=container.server.port if live and container.server else None,
            started_at=container.started_at,
            finished_at=container.finished_at,
            ip_address="127.0.0.1" if live else None,
            container_port=container.last_port,
        )

    def _run(self, container: FakeContainer) -> None:
        """Start the container's process: a new socket and the behaviour's timers."""
        self._stop_process(container)
        container.generation += 1
        container.status = "running"
        container.exit_code = None
        container.started_at = _now()
        container.finished_at = None
        server = FakeServer(f"{container.name}")
        container.server = server
        container.last_port = server.port
        behaviour = container.behaviour
        container.log.append(f"fake: started ({behaviour})")
        kind, seconds = behaviour.kind, behaviour.value
        if kind in ("serve", "crash_after", "hang_after"):
            server.listen()
        if kind == "slow_start":
            self._after(container, seconds, lambda: server.listen())
        elif kind == "hang_after":
            self._after(container, seconds, server.hang)
        elif kind == "crash_after":
            self._after(container, seconds, lambda: self._exit(container, 1))
        elif kind == "exit" and behaviour.delay:
            self._after(container, behaviour.delay, lambda: self._exit(container, int(seconds)))

    def _after(self, container: FakeContainer, seconds: float, action: Callable[[], None]) -> None:
        generation = container.generation

        def fire() -> None:
            with self._lock:
                if container.generation == generation and container.status == "running":
                    action()

        timer = threading.Timer(seconds, fire)
        timer.name = f"fake-timer-{container.name}"
        timer.daemon = True
        container.timers.append(timer)
        timer.start()

    def _exit(self, container: FakeContainer, code: int) -> None:
        container.status = "exited"
        container.exit_code = code
        container.finished_at = _now()
        container.log.append(f"fake: exited with code {code}")
        container.generation += 1  # its pending timers do nothing now
        for timer in container.timers:
            timer.cancel()
        server, container.server = container.server, None
        if server is not None:
            server.close()  # quick: it drops its connections rather than waiting on them

    def _stop_process(self, container: FakeContainer, join: bool = False) -> None:
        """Cancel the container's timers (and, outside the lock, wait for them) and close its
        socket. Cancelled timers stay listed so that `shutdown` can join them."""
        for timer in container.timers:
            timer.cancel()
        if join:
            for timer in container.timers:
                timer.join(5)
        if container.server is not None:
            container.server.close()
            container.server = None
