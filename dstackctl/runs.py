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


# The console script forks the agent from the CLI, which has already imported pydantic, the
# config models and docker-py: that saves a new interpreter and ~0.3 s of imports on every
# `run`. Library callers (tests, programs that embed dstackctl) keep the default, a fresh
# interpreter: forking a process that may hold other threads' locks is not safe.
_fork_agents = False


def fork_agents() -> None:
    """Let `start_agent` fork instead of spawning; only for a single-threaded CLI process."""
    global _fork_agents
    _fork_agents = True


def start_agent(store: Store, name: str) -> None:
    """Start the service's agent detached (own session); its output goes to agent.log."""
    import threading

    if _fork_agents and threading.active_count() == 1:
        _fork_agent(store, name)
    else:
        _spawn_agent(store, name)


def _spawn_agent(store: Store, name: str) -> None:
    import subprocess  # here, not at the top: `ps` imports this module and must start fast

    fd = _open_log(store, name)
    try:
        subprocess.Popen(
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


def _fork_agent(store: Store, name: str) -> None:
    """Double fork: the agent is reparented to init at once, so it never lingers as a zombie
    of a CLI that stays attached."""
    fd = _open_log(store, name)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.close(fd)
        os.waitpid(child, 0)
        return
    code = 1
    try:
        os.setsid()
        code = 0 if os.fork() else _become_agent(store, name, fd)
    except BaseException:  # nothing may return into the CLI's code from here
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _become_agent(store: Store, name: str, log_fd: int) -> int:
    import gc

    # The CLI pauses the collector (cli/gc_policy.py); the agent runs for days and needs it.
    # What the CLI left in memory is frozen: never scanned, and its pages stay shared.
    gc.freeze()
    gc.enable()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.closerange(3, _max_fd())  # the CLI's Docker connection and lock files are not ours
    from dstackctl.agent import main as agent_main

    return agent_main([name, "--home", str(store.home)])


def _max_fd() -> int:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 65536 if soft == resource.RLIM_INFINITY else int(soft)


def _open_log(store: Store, name: str) -> int:
    return os.open(store.log_path(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def stop_agent(store: Store, name: str, timeout: float = 5.0) -> None:
    """SIGTERM the agent, SIGKILL it when it has not exited within `timeout`."""
    pid = store.agent_holder(name)
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
