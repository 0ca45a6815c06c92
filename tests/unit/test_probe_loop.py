"""The probe runner on its own non-blocking sockets (no scripted transport): real servers,
real connections, many probes in flight on one thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import free_port, wait_until

from dstackctl.config.probe_model import ProbeConfig
from dstackctl.probe_transport import ProbeLoop
from dstackctl.probe_wire import ProbeResult
from dstackctl.probes import ProbeRunner, ProbeSample


def _probe(**fields: Any) -> ProbeConfig:
    return ProbeConfig.model_validate({"type": "http", **fields})


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Listening sockets whose every connection is handed to a given function."""
    listeners: list[socket.socket] = []

    def start(answer: Callable[[socket.socket], None]) -> int:
        listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        listeners.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for listener in listeners:
        listener.close()


def _http(status: int, delay: float = 0.0) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            time.sleep(delay)
            conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())

    return answer


def _hang_up(conn: socket.socket) -> None:
    with conn:
        conn.recv(65536)  # read the request, answer nothing


def _fast(**fields: Any) -> ProbeConfig:
    # intervals below dstack's 1s minimum, built without validation, to keep the test short
    return _probe(**fields).model_copy(update={"interval": 0.1})


def test_a_replica_becomes_ready_and_a_failing_one_shows_its_status(raw_server: Any) -> None:
    good, bad = raw_server(_http(200)), raw_server(_http(503))
    runner = ProbeRunner()
    try:
        runner.watch("good", "127.0.0.1", good, [_fast(ready_after=2)])
        runner.watch("bad", "127.0.0.1", bad, [_fast()])
        wait_until(lambda: (runner.snapshot("good") or (False,))[0], 10, "good in rotation")
        views = wait_until(lambda: (runner.views("bad") or ())[0].last_status, 10, "bad probed")
        assert views == 503
        (bad_view,) = runner.views("bad") or ()
        assert (bad_view.last_error, bad_view.success_streak, runner.snapshot("bad")[0]) == (  # type: ignore[index]
            "HTTP 503",
            0,
            False,
        )
    finally:
        runner.close()
    assert not runner._thread.is_alive()


def test_probes_in_flight_do_not_wait_for_each_other(raw_server: Any) -> None:
    # 40 replicas answering after 1.5 s, probed with a 1 s timeout: one thread probing them
    # one at a time would need 40 s for the first round; the loop times them all out at once.
    slow = raw_server(_http(200, delay=1.5))
    samples: list[ProbeSample] = []
    runner = ProbeRunner(on_sample=samples.append)
    began = time.monotonic()
    try:
        for i in range(40):
            runner.watch(f"r{i}", "127.0.0.1", slow, [_probe(timeout=1)])
        wait_until(lambda: len(samples) >= 40, 15, "every first probe to time out")
    finally:
        runner.close()
    first = samples[:40]
    assert {s.result.error for s in first} == {"timed out after 1s"}
    assert max(s.ended for s in first) - began < 5.0, "probes ran one after another"


def test_connection_refused_and_no_answer(raw_server: Any) -> None:
    silent = raw_server(_hang_up)
    runner = ProbeRunner()
    try:
        runner.watch("refused", "127.0.0.1", free_port(), [_fast()])
        runner.watch("silent", "127.0.0.1", silent, [_fast()])

        def errors() -> list[str | None] | None:
            shown = [(runner.views(k) or ())[0].last_error for k in ("refused", "silent")]
            return shown if all(shown) else None

        seen = wait_until(errors, 10, "both probed", interval=0.05)
    finally:
        runner.close()
    assert seen == ["connection refused", "closed the connection without a response"]


def test_a_proxy_answer_with_nothing_behind_it_names_the_container_port(raw_server: Any) -> None:
    # Docker's userland proxy accepts and hangs up when nothing listens in the container: the
    # runner then checks the container's own address, here one that refuses.
    proxy = raw_server(_hang_up)
    inside = free_port()
    runner = ProbeRunner()
    try:
        runner.watch("r0", "127.0.0.1", proxy, [_fast()], address=("127.0.0.1", inside))
        error = wait_until(lambda: (runner.views("r0") or ())[0].last_error, 10, "r0 probed")
    finally:
        runner.close()
    assert error == f"nothing answers on port {inside} inside the container; check `port:`"


def test_a_replica_without_probes_is_ready_once_its_address_accepts(raw_server: Any) -> None:
    port = free_port()
    samples: list[ProbeSample] = []
    runner = ProbeRunner(on_sample=samples.append)
    try:
        runner.watch("r0", "127.0.0.1", 1, [], address=("127.0.0.1", port))
        wait_until(lambda: len(samples) >= 3, 10, "the connect check to be retried")
        assert runner.snapshot("r0") == (False, ())
        with socket.create_server(("127.0.0.1", port)):
            wait_until(lambda: runner.snapshot("r0") == (True, ()), 10, "ready once it accepts")
    finally:
        runner.close()
    assert not samples[0].result.ok


def test_a_result_callback_that_raises_does_not_stop_the_loop(raw_server: Any, caplog: Any) -> None:
    port = raw_server(_http(200))
    loop = ProbeLoop()
    results: list[ProbeResult] = []

    def explode(_result: ProbeResult) -> None:
        raise RuntimeError("boom")

    try:
        loop.probe("127.0.0.1", port, _probe(), explode)
        loop.probe("127.0.0.1", free_port(), _probe(), explode)  # refused
        loop.probe("127.0.0.1", port, _probe(), results.append)
        deadline = time.monotonic() + 10
        while not results and time.monotonic() < deadline:
            loop.poll(0.1)
    finally:
        loop.close()
    assert results == [ProbeResult(True, 200, None)]
    assert caplog.text.count("recording a probe result failed") == 2
