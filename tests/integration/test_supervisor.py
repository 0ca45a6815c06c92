"""The endpoint outlives its agent: a supervisor restarts a killed or hung agent, the endpoint's
socket stays open in between, and the new agent serves the replicas that were ready at once.
`ps` and `run -d` say when nobody is writing a service's state any more."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from helpers import cli, free_port, ps_run, wait_until, write_service

from dstackctl import runs, waiting
from dstackctl.store import Store

HTTPD = "exec httpd -f -p 8000 -h /www"
WAIT = 30.0
# Ready after two probes 8 s apart: an agent that had to earn readiness again would make the
# endpoint wait longer than its 5 s startup grace, and the clients would see 503s.
SLOW_PROBES = "probes:\n  - {type: http, url: /, interval: 8s, ready_after: 2}\n"


@dataclass
class Load:
    """Clients sending requests to the endpoint, each on its own keep-alive connection."""

    url: str
    clients: int = 6
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                answer = session.get(self.url, timeout=20)
                outcome = "ok" if answer.status_code == 200 else f"HTTP {answer.status_code}"
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            with self._lock:
                if outcome == "ok":
                    self.ok += 1
                else:
                    self.failures.append(outcome)

    @classmethod
    @contextlib.contextmanager
    def running(cls, url: str) -> Iterator[Load]:
        load = cls(url)
        threads = [threading.Thread(target=load._client, daemon=True) for _ in range(load.clients)]
        for thread in threads:
            thread.start()
        try:
            yield load
        finally:
            load._stop.set()
            for thread in threads:
                thread.join(30)

    def answered_since(self, count: int) -> int | None:
        return (self.ok - count) or None


def start(capsys: pytest.CaptureFixture[str], tmp_path: Path, image: str, name: str, extra: str = "") -> str:
    path = write_service(tmp_path, name, image, [HTTPD], replicas=2, extra=extra)
    result = cli(capsys, "run", "-d", "--timeout", "60s", str(path))
    assert result.code == 0, result.err
    return str(ps_run(capsys, name)["url"])


def container_ids(capsys: pytest.CaptureFixture[str], name: str) -> set[str]:
    return {r["container_id"] for r in ps_run(capsys, name)["replicas"]}


def new_agent(store: Store, name: str, old: int) -> int | None:
    processes = store.agent_processes(name)
    return processes[0] if len(processes) == 2 and processes[0] != old else None


def test_a_killed_agent_is_restarted_and_only_its_in_flight_requests_fail(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = start(capsys, tmp_path, test_image, "lazarus", SLOW_PROBES)
    store = Store(dstack_home)
    agent, supervisor = store.agent_processes("lazarus")
    before = container_ids(capsys, "lazarus")
    with Load.running(url) as load:
        wait_until(lambda: load.answered_since(0), timeout=WAIT, what="the clients to get answers")
        os.kill(agent, signal.SIGKILL)
        replaced_by = wait_until(lambda: new_agent(store, "lazarus", agent), timeout=WAIT, what="a new agent")
        answered = load.ok
        wait_until(lambda: load.answered_since(answered + 50), timeout=WAIT, what="the new agent's answers")
    assert len(load.failures) <= load.clients, f"more than the in-flight requests failed: {load.failures}"
    assert not [f for f in load.failures if f.startswith("HTTP")], "the new agent answered with errors"
    assert store.agent_processes("lazarus") == [replaced_by, supervisor]
    assert container_ids(capsys, "lazarus") == before, "the new agent replaced containers"
    log = store.log_path("lazarus").read_text()
    assert f"agent pid {agent} was killed by SIGKILL" in log
    assert "kept open by the supervisor" in log
    assert cli(capsys, "stop", "lazarus").code == 0
    assert store.agent_processes("lazarus") == []


def test_a_stopped_agent_is_killed_and_replaced(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = start(capsys, tmp_path, test_image, "frozen")
    store = Store(dstack_home)
    agent = store.agent_holder("frozen")
    assert agent is not None
    os.kill(agent, signal.SIGSTOP)
    wait_until(lambda: new_agent(store, "frozen", agent), timeout=WAIT, what="the hung agent to be replaced")
    assert requests.get(url, timeout=20).status_code == 200
    assert f"agent pid {agent} sent no heartbeat" in store.log_path("frozen").read_text()
    assert cli(capsys, "stop", "frozen").code == 0


def test_the_agent_carries_on_without_its_supervisor_and_stop_still_stops_it(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = start(capsys, tmp_path, test_image, "orphan")
    store = Store(dstack_home)
    agent, supervisor = store.agent_processes("orphan")
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: store.agent_processes("orphan") == [agent], timeout=WAIT, what="the supervisor to die")
    assert requests.get(url, timeout=20).status_code == 200
    assert cli(capsys, "stop", "orphan").code == 0
    assert not store.agent_alive("orphan")
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)


def test_ps_and_run_say_when_nobody_writes_the_state_any_more(
    dstack_home: Path,
    tmp_path: Path,
    test_image: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runs, "STALE_STATE_SECONDS", 3.0)
    monkeypatch.setattr(waiting, "STALE_WAIT_SECONDS", 1.0)
    path = write_service(tmp_path, "statue", test_image, [HTTPD])
    assert cli(capsys, "run", "-d", "--timeout", "60s", str(path)).code == 0
    store = Store(dstack_home)
    processes = store.agent_processes("statue")
    for pid in reversed(processes):  # the supervisor first: it must not replace the agent
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: "is 3s old" in cli(capsys, "ps", "statue").err or None,
            timeout=WAIT,
            what="ps to warn about the old state",
        )
        again = cli(capsys, "run", "-d", "--timeout", "60s", str(path))
        assert again.code == 1, again.out + again.err
        assert "the agent of statue has not written its state for" in again.err
    finally:
        for pid in processes:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: "old" not in cli(capsys, "ps", "statue").err, timeout=WAIT, what="a fresh state")
    # The supervisor was stopped too: it must not take the agent's silence for a hang.
    assert store.agent_processes("statue") == processes
    assert cli(capsys, "stop", "statue").code == 0


def test_a_new_local_port_moves_the_endpoint(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = start(capsys, tmp_path, test_image, "mover")
    path = tmp_path / "mover.dstack.yml"
    port = free_port()
    moved = cli(capsys, "run", "-d", "--timeout", "60s", "--port", str(port), str(path))
    assert moved.code == 0, moved.err
    old_port = url.rsplit(":", 1)[1]
    assert f"mover: moving the endpoint from port {old_port} to {port}." in moved.err
    assert ps_run(capsys, "mover")["url"] == f"http://127.0.0.1:{port}"
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=20).status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    assert cli(capsys, "stop", "mover").code == 0
