"""Driving the real service agent, in a thread of the test process, on a FakeEngine.

The one place that knows where the CLI's core functions and the agent live (before and after
the agent/services refactor) and how to hand the agent its engine. Specs are submitted with
the CLI's own `submit` and `start_rollout`; outcomes are read from state.json only (with
`rollout_state`, which falls back to spec.json's `rollout` until the agent publishes it).
"""

from __future__ import annotations

import inspect
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine
from helpers import free_port, wait_until

from dstackctl.agent import ServiceAgent
from dstackctl.config.loader import LoadedConfig, parse_service
from dstackctl.store import Store

try:
    from dstackctl.deploy import Release, start_rollout, submit
except ImportError:
    from dstackctl.services import Release, start_rollout, submit

NAME = "svc"
ROLLOUT_TIMEOUT = 60
HTTP_PROBE = """probes:
  - type: http
    url: /health
    interval: 1s
    timeout: 1s
"""


def service_yaml(
    *,
    replicas: int = 1,
    behaviour: str = "serve",
    probes: bool = True,
    env: dict[str, str] | None = None,
    extra: str = "",
) -> str:
    """A service file; `behaviour` goes to the replicas as FAKE_BEHAVIOUR (see fake_engine)."""
    variables = {"FAKE_BEHAVIOUR": behaviour, **(env or {})}
    lines = [
        "type: service",
        f"name: {NAME}",
        "image: fake/replica:1",
        "port: 8000",
        f"replicas: {replicas}",
        "env:",
        *(f"  - {key}={value}" for key, value in variables.items()),
    ]
    return "\n".join(lines) + "\n" + (HTTP_PROBE if probes else "probes: []\n") + extra


def load(text: str) -> tuple[LoadedConfig, dict[str, str]]:
    loaded = parse_service(text, "<test>")
    return loaded, loaded.resolve_env({})


class RecordingStore(Store):
    """A Store that keeps a copy of every state.json document written (by any thread)."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.states: list[dict[str, Any]] = []

    def write(self, name: str, kind: str, document: dict[str, Any]) -> None:
        super().write(name, kind, document)
        if kind == "state":
            self.states.append(json.loads(json.dumps(document)))


class AgentThread:
    """The real ServiceAgent running in a thread of this process on the fake engine."""

    def __init__(self, store: Store, name: str, engine: FakeEngine) -> None:
        self.stop_event = threading.Event()
        if "engine" in inspect.signature(ServiceAgent).parameters:
            self.agent = ServiceAgent(store, name, self.stop_event, engine=engine)
        else:
            self.agent = ServiceAgent(store, name, self.stop_event)
            self.agent.engine = engine  # _connect() keeps an engine it already has
        self.result: int | BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"agent-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.agent.run()
        except BaseException as exc:
            self.result = exc

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent did not stop within 30s of its stop event"
        assert self.result == 0, f"the agent ended with {self.result!r}"


class Scenario:
    """One test's store, fake engine and agents; `close()` stops them all."""

    def __init__(self, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = RecordingStore(home)
        self.engine = FakeEngine()
        self.agents: list[AgentThread] = []
        self.engine.patch_connect(monkeypatch)
        # `submit` and `start_rollout` start a detached agent process: here the test's own
        # in-thread agent does that work (and holds the agent lock, so ensure_agent is a no-op).
        modules = {sys.modules[submit.__module__], sys.modules[start_rollout.__module__]}
        for module in modules:
            if hasattr(module, "start_agent"):
                monkeypatch.setattr(module, "start_agent", lambda _store, _name: None)

    def close(self) -> None:
        try:
            for agent in self.agents:
                agent.stop_event.set()
            for agent in self.agents:
                agent.thread.join(30)
        finally:
            leftover = self.engine.shutdown()
        assert not [a for a in self.agents if a.thread.is_alive()], "an agent thread outlived its test"
        assert not leftover, f"fake engine threads left after its shutdown: {leftover}"

    # --- driving ------------------------------------------------------------------------

    def submit(self, text: str) -> None:
        loaded, env = load(text)
        submit(self.store, loaded, NAME, env, free_port(), ROLLOUT_TIMEOUT)

    def roll_out(self, text: str) -> int:
        loaded, env = load(text)
        return start_rollout(self.store, NAME, Release.of(loaded, env), ROLLOUT_TIMEOUT)

    def start_agent(self) -> AgentThread:
        agent = AgentThread(self.store, NAME, self.engine)
        self.agents.append(agent)
        return agent

    # --- reading outcomes (state.json) --------------------------------------------------

    def state(self) -> dict[str, Any]:
        return self.store.read(NAME, "state") or {}

    def rows(self) -> list[dict[str, Any]]:
        return list(self.state().get("replicas") or [])

    def rollout_state(self) -> dict[str, Any]:
        return rollout_state(self.store, NAME)

    def served_deployment(self) -> int:
        """The deployment the agent serves: state.json's after the refactor, else spec.json's."""
        state = self.state()
        if "deployment_num" in state:
            return int(state["deployment_num"])
        return int((self.store.read(NAME, "spec") or {})["deployment_num"])

    def wait_rows(
        self,
        check: Callable[[list[dict[str, Any]]], bool],
        what: str,
        timeout: float = 15,
    ) -> list[dict[str, Any]]:
        """Wait until state.json's rows satisfy `check`; returns them."""

        def rows_if_done() -> list[dict[str, Any]] | None:
            rows = self.rows()
            return rows if rows and check(rows) else None

        return wait_until(rows_if_done, timeout, what)

    def wait_ready(self, replicas: int, deployment: int, timeout: float = 15) -> list[dict[str, Any]]:
        """Until exactly `replicas` rows, all of `deployment`, running and ready."""
        return self.wait_rows(
            lambda rows: (
                len(rows) == replicas
                and all(
                    r["deployment_num"] == deployment and r["status"] == "running" and r["ready"]
                    for r in rows
                )
            ),
            f"{replicas} ready replicas of deployment {deployment}",
            timeout,
        )

    def wait_rollout(self, state: str, timeout: float = 20) -> dict[str, Any]:
        return wait_until(
            lambda: (rollout := self.rollout_state()).get("state") == state and rollout,
            timeout,
            f"the rollout to be {state}",
        )


def rollout_state(store: Store, name: str) -> dict[str, Any]:
    """The rollout as the agent reports it: state.json's `rollout` (after the refactor),
    else spec.json's (today the agent writes the outcome there). `{}` when there is none."""
    state = store.read(name, "state") or {}
    if "rollout" in state:
        return dict(state["rollout"] or {})
    return dict((store.read(name, "spec") or {}).get("rollout") or {})
