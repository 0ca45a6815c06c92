"""Read-only views of services for `ps` and waiting, built from the store alone.

Kept free of pydantic and docker-py imports: `ps` must start fast.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from dstackctl.store import SPEC, STATE, Store, StoreError

ACTIVE = ("pending", "provisioning", "running", "terminating")


@dataclass
class RunView:
    name: str
    status: str
    deployment_num: int
    submitted_at: str | None
    url: str | None
    replicas: list[dict[str, Any]]
    desired: str
    agent_alive: bool
    engine_problem: str | None = None
    endpoint_error: str | None = None
    rollout: dict[str, Any] | None = None
    probes: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.desired == "running"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "deployment_num": self.deployment_num,
            "submitted_at": self.submitted_at,
            "url": self.url,
            "agent_alive": self.agent_alive,
            "rollout": self.rollout,
            "replicas": [
                {
                    "replica_num": r["replica_num"],
                    "job_num": r.get("job_num", 0),
                    "deployment_num": r.get("deployment_num", self.deployment_num),
                    "status": r["status"],
                    "container_id": r.get("container_id"),
                    "ready": bool(r.get("ready")),
                    "probes": r.get("probes") or [],
                    "host_port": r.get("host_port"),
                    "url": r.get("url"),
                    "exit_code": r.get("exit_code"),
                    "message": r.get("message"),
                    "log_tail": r.get("log_tail") or [],
                    "gpus": r.get("gpus") or [],
                }
                for r in self.replicas
            ],
        }


def view(store: Store, name: str) -> RunView | None:
    spec = store.read(name, SPEC)
    if spec is None:
        return None
    state = store.read(name, STATE) or {}
    if state.get("run_id") not in (None, spec.get("run_id")):
        state = {}  # an older run's observations
    desired = spec.get("desired", "running")
    alive = store.agent_alive(name) if desired == "running" else False
    status = state.get("status") or "pending"
    if desired == "stopped" and status in ACTIVE:
        status = "terminating"
    return RunView(
        name=name,
        status=status,
        deployment_num=int(spec.get("deployment_num", 0)),
        submitted_at=spec.get("submitted_at"),
        url=state.get("url"),
        replicas=list(state.get("replicas") or []),
        desired=desired,
        agent_alive=alive,
        engine_problem=state.get("engine_problem"),
        endpoint_error=state.get("endpoint_error"),
        rollout=spec.get("rollout"),
        probes=list(spec.get("probe_urls") or []),
    )


def all_views(store: Store, include_stopped: bool, problems: list[str] | None = None) -> list[RunView]:
    """Every readable service; the sentence of each unreadable one goes to `problems`."""
    views = []
    for name in store.names():
        try:
            found = view(store, name)
        except StoreError as exc:
            if problems is None:
                raise
            problems.append(exc.message)
            continue
        if found is not None and (include_stopped or found.active):
            views.append(found)
    return views


def describe_probes(replica: dict[str, Any], label: str = "") -> str:
    """`/health 1/2 ok` or `/health 0/2 (HTTP 503)` for each probe, comma-separated."""
    parts = []
    for probe in replica.get("probes") or []:
        text = f"{label}{probe['url']} {probe['success_streak']}/{probe['ready_after']}"
        if probe.get("last_error"):
            text += f" ({probe['last_error']})"
        elif probe.get("last_checked_at"):
            text += " ok"
        else:
            text += " (not probed yet)"
        parts.append(text)
    return ", ".join(parts)


# --- the agent process -----------------------------------------------------------------


def start_agent(store: Store, name: str) -> int:
    """Start the service's agent detached (own session); its output goes to agent.log."""
    import subprocess  # here, not at the top: `ps` imports this module and must start fast

    log_path = store.log_path(name)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "dstackctl.agent", name, "--home", str(store.home)],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    finally:
        os.close(fd)
    return process.pid


def agent_pid(store: Store, name: str) -> int | None:
    """The live agent's pid, checked against its command line so a reused pid is not hit."""
    state = store.read(name, STATE) or {}
    pid = (state.get("agent") or {}).get("pid")
    if not isinstance(pid, int):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return None
    if b"dstackctl.agent" in argv and name.encode() in argv and str(store.home).encode() in argv:
        return pid
    return None


def stop_agent(store: Store, name: str, timeout: float = 5.0) -> None:
    """SIGTERM the agent, SIGKILL it when it has not exited within `timeout`."""
    pid = agent_pid(store, name)
    if pid is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not store.agent_alive(name):
                return
            time.sleep(0.05)
