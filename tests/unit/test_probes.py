"""Probe execution against a real local HTTP server, and the runner's streak/readiness logic."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from helpers import wait_until

from dstackctl.config.models import ServiceConfiguration
from dstackctl.config.probe_model import ProbeConfig
from dstackctl.config.probe_values import resolve_probes
from dstackctl.probe_transport import ProbeLoop
from dstackctl.probe_wire import USER_AGENT, ProbeResult, execute_probe
from dstackctl.probes import FAILURES_TO_LEAVE, ProbeRunner, recorded
from dstackctl.status import ProbeView

SLOW_ANSWER_SECONDS = 5.0  # /slow answers this late: far past the probe timeouts used here


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        _Handler.seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        if self.path.startswith("/status/"):
            code = int(self.path.rsplit("/", 1)[1])
            self.send_response(code)
            if 300 <= code < 400:
                self.send_header("Location", "/status/200")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(SLOW_ANSWER_SECONDS)
            self.send_response(200)
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 1024 * 1024))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"x" * (10 * 1024 * 1024))
        else:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


def _probe(**fields: Any) -> ProbeConfig:
    return ProbeConfig.model_validate({"type": "http", **fields})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


RunProbe = Callable[[str, int, ProbeConfig], ProbeResult]


def _through_the_loop(host: str, port: int, probe: ProbeConfig) -> ProbeResult:
    """One probe on the runner's non-blocking transport, driven from this thread."""
    results: list[ProbeResult] = []
    loop = ProbeLoop()
    try:
        loop.probe(host, port, probe, results.append)
        deadline = time.monotonic() + probe.timeout + 5
        while not results and time.monotonic() < deadline:
            in_flight = loop.seconds_to_deadline()
            loop.poll(min(in_flight, 0.5) if in_flight is not None else 0.5)
    finally:
        loop.close()
    assert results, "the probe never finished"
    return results[0]


@pytest.fixture(params=["blocking", "non-blocking"])
def run_probe(request: pytest.FixtureRequest) -> RunProbe:
    """Each probe outcome, both from execute_probe and from the runner's ProbeLoop."""
    return execute_probe if request.param == "blocking" else _through_the_loop


def test_2xx_is_success_with_user_agent(server: int, run_probe: RunProbe) -> None:
    result = run_probe("127.0.0.1", server, _probe(url="/health"))
    assert result == ProbeResult(True, 200, None)
    assert _Handler.seen[-1]["headers"]["User-Agent"] == USER_AGENT


@pytest.mark.parametrize("code", [301, 302, 404, 500, 503])
def test_other_statuses_fail_and_redirects_are_not_followed(
    server: int, code: int, run_probe: RunProbe
) -> None:
    before = len(_Handler.seen)
    result = run_probe("127.0.0.1", server, _probe(url=f"/status/{code}"))
    assert result == ProbeResult(False, code, f"HTTP {code}")
    assert len(_Handler.seen) == before + 1  # no second request to the Location


def test_post_sends_headers_and_body(server: int, run_probe: RunProbe) -> None:
    probe = _probe(
        url="/check",
        method="post",
        headers=[{"name": "X-API-Key", "value": "k1"}],
        body='{"level": 2}',
    )
    assert run_probe("127.0.0.1", server, probe).ok
    seen = _Handler.seen[-1]
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/check", b'{"level": 2}')
    assert seen["headers"]["X-API-Key"] == "k1"


def test_refused_connection(run_probe: RunProbe) -> None:
    result = run_probe("127.0.0.1", _free_port(), _probe())
    assert result == ProbeResult(False, None, "connection refused")


def test_timeout_is_reported_with_its_duration(server: int, run_probe: RunProbe) -> None:
    started = time.monotonic()
    result = run_probe("127.0.0.1", server, _probe(url="/slow", timeout=1))
    assert result == ProbeResult(False, None, "timed out after 1s")
    took = time.monotonic() - started
    assert took < SLOW_ANSWER_SECONDS, f"the probe took {took:.1f}s: it waited for the answer"


def test_large_body_is_read_only_up_to_the_cap(server: int, run_probe: RunProbe) -> None:
    started = time.monotonic()
    assert run_probe("127.0.0.1", server, _probe(url="/big")).ok
    assert time.monotonic() - started < 2.0


def test_streak_and_symbols() -> None:
    status = ProbeView("/h", ready_after=3)
    symbols = []
    for ok in (False, True, True, True, False, True):
        status = recorded(status, ProbeResult(ok, 200 if ok else 503, None if ok else "HTTP 503"))
        symbols.append(status.symbol)
    assert symbols == ["×", "~", "~", "✓", "×", "~"]
    assert status.success_streak == 1
    assert status.last_error is None


class _Script:
    """A fake probe transport: answers from a per-port list of outcomes, then repeats the last."""

    def __init__(self, outcomes: dict[int, list[bool]]) -> None:
        self.outcomes = outcomes
        self.calls: dict[int, list[float]] = {port: [] for port in outcomes}
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int, probe: ProbeConfig) -> ProbeResult:
        with self.lock:
            calls = self.calls[port]
            calls.append(time.monotonic())
            plan = self.outcomes[port]
            ok = plan[min(len(calls) - 1, len(plan) - 1)]
        return ProbeResult(ok, 200 if ok else 503, None if ok else "HTTP 503")


def test_replica_without_probes_is_ready_only_once_its_address_accepts_a_connection() -> None:
    attempts: list[tuple[str, int]] = []
    listening = threading.Event()

    def connect(host: str, port: int) -> bool:
        attempts.append((host, port))
        return listening.is_set()

    runner = ProbeRunner(workers=2, execute=_Script({}), connect=connect)
    try:
        runner.watch("r0", "127.0.0.1", 1, [], address=("172.17.0.9", 8000))
        wait_until(lambda: len(attempts) >= 3, 10, "the connect check to be retried")
        assert runner.snapshot("r0") == (False, ())  # nothing listens: never ready
        listening.set()
        wait_until(lambda: runner.snapshot("r0") == (True, ()), 10, "ready once a connection succeeds")
    finally:
        runner.close()
    # The container's own address, never the published host port (Docker's userland proxy
    # accepts connections there even when nothing listens behind it).
    assert set(attempts) == {("172.17.0.9", 8000)}


def test_ready_after_then_leaves_rotation_after_three_failures() -> None:
    plan = [True, True] + [False] * FAILURES_TO_LEAVE + [False, False, True, True]
    script = _Script({1: plan})
    states: list[tuple[bool, int]] = []
    runner = ProbeRunner(workers=2, execute=script)

    def record(_key: str) -> None:
        snapshot = runner.snapshot("r0")
        if snapshot and snapshot[1]:
            states.append((snapshot[0], snapshot[1][0].success_streak))

    runner._on_change = record
    # interval below dstack's 1s minimum, built without validation, to keep the test short
    fast = _probe(ready_after=2).model_copy(update={"interval": 0.05})
    try:
        runner.watch("r0", "127.0.0.1", 1, [fast])
        wait_until(lambda: len(script.calls[1]) >= len(plan) + 1, 10, "every scripted probe ran")
    finally:
        runner.close()
    assert states[:7] == [
        (False, 0),  # registered, not probed yet
        (False, 1),  # ~
        (True, 2),  # ✓ and in rotation
        (True, 0),  # × shown at once, but still in rotation
        (False, 0),  # the third failure in a row takes it out
        (False, 1),  # back to ~ ...
        (True, 2),  # ... and in rotation again after ready_after successes
    ]


def test_interval_counts_from_the_end_of_the_previous_probe() -> None:
    interval = 0.25  # below dstack's 1s minimum, built without validation, to keep the test short
    ended: list[float] = []

    class Slow(_Script):
        """Each probe takes as long as the interval and notes when it ended."""

        def __call__(self, host: str, port: int, probe: ProbeConfig) -> ProbeResult:
            result = super().__call__(host, port, probe)
            time.sleep(interval)
            ended.append(time.monotonic())
            return result

    script = Slow({1: [True]})
    runner = ProbeRunner(workers=2, execute=script)
    try:
        runner.watch("r0", "127.0.0.1", 1, [_probe().model_copy(update={"interval": interval})])
        wait_until(lambda: len(script.calls[1]) >= 3, 10, "three probes")
    finally:
        runner.close()
    # Lower bounds only (a loaded machine makes every gap longer): each probe began at least
    # one interval after the previous one ended. Counted from the start instead, the next
    # probe would be due just as the previous one ends, a whole interval too early.
    starts, ends = script.calls[1][1:3], ended[:2]
    idle = [start - end for end, start in zip(ends, starts, strict=True)]
    assert all(gap >= interval for gap in idle), idle


def test_until_ready_stops_probing_once_ready() -> None:
    # intervals below dstack's 1s minimum, built without validation, to keep the test short
    interval = 0.25
    script = _Script({1: [True], 2: [True]})
    runner = ProbeRunner(workers=2, execute=script)
    try:
        once = _probe(ready_after=2, until_ready=True).model_copy(update={"interval": interval})
        runner.watch("r0", "127.0.0.1", 1, [once])
        wait_until(lambda: len(script.calls[1]) >= 2, 10, "two probes of r0, which make it ready")
        # A witness watched only now: its 4th probe is due three intervals later, so by then
        # the shared scheduler would have run r0's next probe (due one interval after its
        # second ended) had it still been probing r0.
        runner.watch("witness", "127.0.0.1", 2, [_probe().model_copy(update={"interval": interval})])
        wait_until(lambda: len(script.calls[2]) >= 4, 10, "four probes of the witness")
    finally:
        runner.close()
    assert len(script.calls[1]) == 2
    assert runner.snapshot("r0") is not None


def test_forget_stops_probing_and_close_is_fast() -> None:
    script = _Script({1: [True], 2: [True]})
    runner = ProbeRunner(workers=2, execute=script)
    # an interval below dstack's 1s minimum, built without validation, to keep the test short
    fast = _probe().model_copy(update={"interval": 0.25})
    runner.watch("a", "127.0.0.1", 1, [fast])
    runner.watch("b", "127.0.0.1", 2, [fast])
    wait_until(lambda: script.calls[1] and script.calls[2], 5, "both probed")
    runner.forget("a")
    count, b_count = len(script.calls[1]), len(script.calls[2])
    # three more probes of b: a, were it still watched, would have been probed again meanwhile
    wait_until(lambda: len(script.calls[2]) >= b_count + 3, 10, "b keeps being probed")
    assert len(script.calls[1]) <= count + 1  # at most the probe already under way
    runner.close()
    # close returns within its own timeout, with the scheduler ended rather than abandoned
    assert not runner._thread.is_alive(), "close returned while the scheduler still ran"


def test_env_interpolation_in_url_headers_and_body() -> None:
    config = ServiceConfiguration.model_validate(
        {
            "type": "service",
            "port": 8000,
            "env": ["KEY", "LEVEL=2"],
            "probes": [
                {
                    "type": "http",
                    "method": "post",
                    "url": "/h?l=${{ env.LEVEL }}",
                    "headers": [{"name": "X-API-Key", "value": "${{ env.KEY }}"}],
                    "body": '{"price": "$$5", "l": ${{ env.LEVEL }}}',
                }
            ],
        }
    )
    (probe,) = resolve_probes(config, {"KEY": "s3cret", "LEVEL": "2"})
    assert probe.url == "/h?l=2"
    assert probe.headers[0].value == "s3cret"
    assert probe.body == '{"price": "$5", "l": 2}'
