"""The supervisor with stand-in agents (forked functions): restarts, hangs, clean exits and the
endpoint's listening socket handed from one agent to the next."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from dstackctl.agent import supervisor
from dstackctl.agent.supervisor import Supervisor, SupervisorLink


def runs(path: Path) -> int:
    """How many agents started (each appends a line)."""
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_an_agent_that_exits_0_ends_the_supervision(tmp_path: Path) -> None:
    log = tmp_path / "runs"

    def agent(_link: SupervisorLink) -> int:
        with log.open("a") as handle:
            handle.write("ran\n")
        return 0

    assert Supervisor(agent).run() == 0
    assert runs(log) == 1


def test_a_killed_agent_is_started_again_at_once(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    pids: list[int] = []

    def agent(_link: SupervisorLink) -> int:
        with log.open("a") as handle:
            handle.write("ran\n")
        if runs(log) < 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    began = time.monotonic()
    assert Supervisor(agent).run(on_agent=pids.append) == 0
    assert runs(log) == 3 and len(set(pids)) == 3
    assert time.monotonic() - began < 5  # two quick failures: no back-off yet


def test_an_agent_without_heartbeats_is_killed_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "HANG_SECONDS", 0.5)
    log = tmp_path / "runs"

    def agent(link: SupervisorLink) -> int:
        with log.open("a") as handle:
            handle.write("ran\n")
        if runs(log) == 1:
            time.sleep(60)  # hangs: no heartbeat
        link.beat()
        return 0

    began = time.monotonic()
    assert Supervisor(agent).run() == 0
    assert runs(log) == 2
    assert time.monotonic() - began < 30


def test_the_next_agent_inherits_the_listening_socket(tmp_path: Path) -> None:
    seen = tmp_path / "seen"

    def agent(link: SupervisorLink) -> int:
        if link.inherited is None:
            listener = socket.create_server(("127.0.0.1", 0))
            link.keep_listener(listener)
            seen.write_text(str(listener.getsockname()[1]))
            return 3  # fails: the supervisor starts another
        seen.write_text(f"{seen.read_text()} {link.inherited.getsockname()[1]}")
        return 0

    assert Supervisor(agent).run() == 0
    first, second = seen.read_text().split()
    assert first == second


def test_restarts_back_off_only_after_repeated_quick_failures() -> None:
    assert [supervisor._backoff(n) for n in range(1, 8)] == [0, 0, 1, 2, 4, 8, 16]
    assert supervisor._backoff(20) == supervisor.MAX_BACKOFF_SECONDS


def test_a_supervisor_that_was_stopped_itself_does_not_take_the_silence_for_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "HANG_SECONDS", 0.5)
    log = tmp_path / "runs"
    calls = []
    real_select = supervisor.select.select

    def stalling_select(*args: object) -> object:  # the supervisor stopped once (kill -STOP)
        calls.append(1)
        if len(calls) == 2:
            time.sleep(1.5)
            return [], [], []  # woken without having read the beats that came meanwhile
        return real_select(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(supervisor.select, "select", stalling_select)

    def agent(link: SupervisorLink) -> int:
        with log.open("a") as handle:
            handle.write("ran\n")
        for _ in range(30):
            link.beat()
            time.sleep(0.1)
        return 0

    assert Supervisor(agent).run() == 0
    assert runs(log) == 1
