"""Autoscaling on the real engine, with dstack's shortest window (30s) and short delays.

One service goes through a whole day in a few minutes: at zero replicas, a steady load at
1.5 rps for a target of 1 brings ceil(1.5 / 1) = 2 replicas (never 3); a redeploy while scaled
replaces both; a lighter load takes it back to one replica under traffic; without traffic it
goes to zero after the delay; then one request wakes it and is answered. The client counts
every request and none may fail; the endpoint's published rate must match what was sent; the
agent's log must show each scaling decision no sooner than its delay allows.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
import requests
from helpers import cli, free_port, kill_agent_and_supervisor, wait_until

from dstackctl.status import ObservedState
from dstackctl.store import STATE, Store

pytestmark = [pytest.mark.docker, pytest.mark.slow]

WINDOW = 30
UP_DELAY = 2
DOWN_DELAY = 5
TARGET = 1


class Load:
    """Requests at a steady rate from a thread pool (each on its own schedule, so a slow
    answer does not delay the next); every answer is kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: list[tuple[float, int, str]] = []  # (when sent, status, body or error)
        self._rate = 0.0
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=8)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def start(self, rate: float) -> None:
        self._rate = rate
        if not self._thread.is_alive():
            self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self._rate > 0:
                self._pool.submit(self._one)
                next_at += 1 / self._rate
            else:
                next_at = time.monotonic() + 0.1
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _one(self) -> None:
        sent = time.monotonic()
        try:
            response = requests.get(f"{self.url}/cgi-bin/whoami", timeout=60)
            outcome = (sent, response.status_code, response.text.strip())
        except requests.RequestException as exc:
            outcome = (sent, 0, str(exc))
        with self._lock:
            self.sent.append(outcome)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pool.shutdown(wait=True)

    def failures(self) -> list[tuple[float, int, str]]:
        with self._lock:
            return [answer for answer in self.sent if answer[1] != 200]


def observed_of(name: str) -> ObservedState:
    return ObservedState.from_json(Store().read(name, STATE) or {})


def observed() -> ObservedState:
    return observed_of("auto")


def replicas_ready(count: int, deployment: int | None = None) -> bool:
    state = observed()
    rows = [r for r in state.replicas if deployment is None or r.deployment_num == deployment]
    return len(state.replicas) == count and len(rows) == count and all(r.ready for r in rows)


def scaling_events(log: Path) -> list[tuple[datetime, int, int]]:
    found = []
    for line in log.read_text().splitlines():
        match = re.match(r"(\S+ \S+) INFO group 0: scaling (\d+) -> (\d+):", line)
        if match:
            when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
            found.append((when, int(match[2]), int(match[3])))
    return found


def test_load_scales_up_a_redeploy_keeps_the_count_and_idle_scales_to_zero_and_back(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    path = tmp_path / "auto.dstack.yml"
    path.write_text(
        "type: service\nname: auto\n"
        f"image: {test_image}\nport: '{port}:8000'\nreplicas: 0..3\n"
        f"scaling: {{metric: rps, target: {TARGET}, window: {WINDOW}s, "
        f"scale_up_delay: {UP_DELAY}s, scale_down_delay: {DOWN_DELAY}s}}\n"
        "commands: ['exec httpd -f -p 8000 -h /www']\n"
        "probes: [{type: http, url: /cgi-bin/health, interval: 1s}]\n"
    )
    started = cli(capsys, "run", "-d", path, "--timeout", "60s")
    assert started.code == 0, started.err
    assert "0 of 0 replicas; autoscaled within 0..3" in started.err + started.out
    assert observed().scaling["0"].desired == 0
    load = Load(f"http://127.0.0.1:{port}")
    try:
        # 1.5 rps for a target of 1: two replicas, and never a third.
        load.start(1.5)
        wait_until(lambda: replicas_ready(2), timeout=60, what="two ready replicas under 1.5 rps")
        wait_until(lambda: {"auto 0", "auto 1"} <= {b for _, _, b in load.sent}, 20, "answers from both")
        assert {body for _, _, body in load.sent} <= {"auto 0", "auto 1"}

        # A redeploy while scaled to two replaces two; scaling waits for it.
        redeployed = cli(capsys, "redeploy", "auto", "--timeout", "60s")
        assert redeployed.code == 0, redeployed.err
        assert replicas_ready(2, deployment=1), observed().replicas

        # The published rate is what was sent (the window's requests / the window).
        state = observed()
        since = time.monotonic() - WINDOW
        sent = sum(1 for when, _, _ in load.sent if when >= since)
        assert abs(state.scaling["0"].rps * WINDOW - sent) <= 3, (state.scaling, sent)

        # 0.5 rps: back to one replica, drained under traffic.
        load.start(0.5)
        wait_until(lambda: replicas_ready(1), timeout=90, what="one replica under 0.5 rps")
        load.start(0)
        wait_until(lambda: not observed().replicas, timeout=90, what="scaled to zero without traffic")
        assert observed().scaling["0"].desired == 0
    finally:
        load.stop()
    assert load.failures() == [], load.failures()[:5]
    assert len(load.sent) >= 30  # ~12s at 1.5 rps, the redeploy, then 0.5 rps until one replica

    # At zero, one request wakes the service and is answered.
    began = time.monotonic()
    response = requests.get(f"http://127.0.0.1:{port}/cgi-bin/whoami", timeout=60)
    assert response.status_code == 200, response.text
    assert response.text.startswith("auto ")
    assert time.monotonic() - began < 15

    events = scaling_events(dstack_home / "services" / "auto" / "agent.log")
    steps = [(before, after) for _, before, after in events]
    assert steps[0] == (0, 1) and (1, 2) in steps and (1, 0) in steps and steps[-1] == (0, 1), steps
    assert all(after <= 2 for _, after in steps), steps
    for (earlier, _, _), (later, before, after) in itertools.pairwise(events):
        gap = (later - earlier).total_seconds()
        if before > 0:  # from zero it scales at once
            assert gap >= (UP_DELAY if after > before else DOWN_DELAY) - 0.05, (events, gap)

    # The state file follows the endpoint's rotation within a publish gap.
    wait_until(lambda: replicas_ready(1), timeout=10, what="the woken replica published as ready")
    table = cli(capsys, "ps", "-v", "auto").out
    assert re.search(r"auto deployment=1 .* 1/1 \(0\.\.3\)", table), table
    assert "   group=0 " in table and "target 1 rps over 30s" in table, table
    assert cli(capsys, "stop", "auto", "-y").code == 0


def test_a_request_at_zero_gets_a_503_with_retry_after_when_no_replica_gets_ready_in_time(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The wait is bounded by run's --timeout: a replica whose probe never passes leaves the
    request a 503 with Retry-After and a JSON reason, not a hang."""
    port = free_port()
    path = tmp_path / "sleepy.dstack.yml"
    path.write_text(
        "type: service\nname: sleepy\n"
        f"image: {test_image}\nport: '{port}:8000'\nreplicas: 0..1\n"
        "scaling: {metric: rps, target: 1, window: 30s}\n"
        "commands: ['exec httpd -f -p 8000 -h /www']\n"
        "probes: [{type: http, url: /no-such-page, interval: 1s}]\n"
    )
    started = cli(capsys, "run", "-d", path, "--timeout", "4s")
    assert started.code == 0, started.err
    began = time.monotonic()
    response = requests.get(f"http://127.0.0.1:{port}/cgi-bin/whoami", timeout=60)
    waited = time.monotonic() - began
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"].isdigit()
    assert "became ready within 4s" in response.json()["error"]
    assert 3.5 <= waited < 10, waited
    # The request woke the service: its replica was started (and is still not ready).
    assert [r.replica_num for r in observed_of("sleepy").replicas] == [0]
    assert cli(capsys, "stop", "sleepy", "-y").code == 0


def test_a_restarted_agent_keeps_the_decided_count_and_its_containers(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The count is the agent's observed state: a new agent reads it back, adopts the replica,
    and (with no request history of its own) does not scale down before a whole window."""
    port = free_port()
    path = tmp_path / "kept.dstack.yml"
    path.write_text(
        "type: service\nname: kept\n"
        f"image: {test_image}\nport: '{port}:8000'\nreplicas: 0..2\n"
        "scaling: {metric: rps, target: 1, window: 30s, scale_down_delay: 1s}\n"
        "commands: ['exec httpd -f -p 8000 -h /www']\n"
        "probes: [{type: http, url: /cgi-bin/health, interval: 1s}]\n"
    )
    assert cli(capsys, "run", "-d", path, "--timeout", "60s").code == 0
    assert requests.get(f"http://127.0.0.1:{port}/cgi-bin/whoami", timeout=60).status_code == 200
    wait_until(lambda: len(observed_of("kept").replicas) == 1, timeout=10, what="the woken replica")
    [replica] = observed_of("kept").replicas

    store = Store(dstack_home)
    agent = store.agent_holder("kept")
    assert agent is not None
    kill_agent_and_supervisor(store, "kept")
    again = cli(capsys, "run", "-d", path, "--timeout", "60s")
    assert again.code == 0, again.err
    assert "restarted it" in again.err

    def held_for_a_window() -> ObservedState | None:
        # Within 1 s of the wake the scale_down_delay holds the count anyway; after it, only
        # the restarted agent's "whole window first" rule does: a broken rule scales to 0.
        state = observed_of("kept")
        if state.agent.get("pid") in (None, agent) or not state.scaling:
            return None
        assert state.scaling["0"].desired == 1, state.scaling
        return state if "counting a whole window" in (state.scaling["0"].pending or "") else None

    state = wait_until(held_for_a_window, timeout=15, what="the new agent to hold the count for a window")
    assert [r.container_id for r in state.replicas] == [replica.container_id]
    assert cli(capsys, "stop", "kept", "-y").code == 0
