"""Publishing observed state: the replicas' phases and the agent's facts, to state.json.

A change pushed by the replica book is written promptly (spaced by what a write costs, at
least MIN_PUBLISH_GAP_SECONDS apart); with no change, a heartbeat every HEARTBEAT_SECONDS.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from dstackctl.agent.phases import Phase, ReplicaBook, ReplicaKey, ReplicaState
from dstackctl.status import GroupScaling, ObservedState, ReplicaRow, RolloutStatus, run_status
from dstackctl.store import STATE, Store
from dstackctl.timeutil import utc_now
from dstackctl.wording import count_of

HEARTBEAT_SECONDS = 2.0
# A change after a quiet spell reaches the store at once; then writes are spaced by
# PUBLISH_CPU_FACTOR times the CPU the last one took (so they cost at most a tenth of a core:
# a 1000-replica state is ~650 KiB of JSON), and by at least MIN_PUBLISH_GAP_SECONDS.
MIN_PUBLISH_GAP_SECONDS = 0.02
PUBLISH_CPU_FACTOR = 10

log = logging.getLogger("dstackctl.agent")


@dataclass
class Facts:
    """What the agent knows beyond the replicas' phases."""

    run_id: str | None = None
    observed_deployment: int | None = None
    deployment_num: int | None = None
    target_replicas: int | None = None
    config_hash: str = ""
    rollout: RolloutStatus | None = None
    url: str | None = None
    engine_problem: str | None = None
    endpoint_error: str | None = None
    scaling: dict[str, GroupScaling] = field(default_factory=dict)
    # replica -> (times replaced, why the last one was)
    restarts: dict[ReplicaKey, tuple[int, str]] = field(default_factory=dict)


class RowSources(Protocol):
    """Lookups that need Docker or nvidia-smi (agent/row_lookups.py)."""

    def log_tail(self, container_id: str, deployment_num: int) -> tuple[str, ...]: ...

    def gpu_rows(self, uuids: tuple[str, ...]) -> tuple[dict[str, Any], ...]: ...


class StatusPublisher:
    def __init__(self, store: Store, name: str, book: ReplicaBook, facts: Facts, sources: RowSources) -> None:
        self._store = store
        self._name = name
        self._book = book
        self.facts = facts
        self._sources = sources
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._last: dict[str, Any] | None = None
        self._last_time = 0.0
        self._started_at = utc_now()
        book.subscribe(lambda _before, _after: self._dirty.set())

    def changed(self) -> None:
        self._dirty.set()

    def rows(self) -> list[ReplicaRow]:
        return [self._row(state) for state in self._book.replicas()]

    def publish(self, force: bool = False) -> None:
        with self._lock:
            rows = self.rows()
            facts = self.facts
            observed = ObservedState(
                name=self._name,
                run_id=facts.run_id,
                status=run_status(rows),
                observed_deployment=facts.observed_deployment,
                deployment_num=facts.deployment_num,
                target_replicas=facts.target_replicas,
                replicas=tuple(rows),
                rollout=facts.rollout,
                url=facts.url,
                engine_problem=facts.engine_problem,
                endpoint_error=facts.endpoint_error,
                scaling=facts.scaling,
            )
            document = observed.to_json()
            now = time.monotonic()
            # A probe's last_checked_at changes on every check; it alone does not warrant a
            # write (a 1000-replica state is ~650 KiB): the heartbeat write carries it.
            comparable = _without_check_times(document)
            if not force and comparable == self._last and now - self._last_time < HEARTBEAT_SECONDS:
                return
            self._last, self._last_time = comparable, now
            agent = {"pid": os.getpid(), "started_at": self._started_at, "heartbeat_at": utc_now()}
            self._store.write(self._name, STATE, {**document, "agent": agent, "updated_at": utc_now()})

    def run(self, stop: threading.Event) -> None:
        """Writes changes promptly, spaced as MIN_PUBLISH_GAP_SECONDS says (a thread's body)."""
        last_write = 0.0
        spacing = MIN_PUBLISH_GAP_SECONDS
        problem: str | None = None  # logged once, not on every heartbeat
        while not stop.is_set():
            # Nothing changed: still a heartbeat every HEARTBEAT_SECONDS, also while the
            # reconcile loop waits on a drain or a pull, so that `ps` can tell a stale state.
            if not self._dirty.wait(0.5) and time.monotonic() - self._last_time < HEARTBEAT_SECONDS:
                continue
            # The gap counts from this thread's own last write: the reconcile loop's writes
            # must not delay a probe result that just changed readiness.
            gap = spacing - (time.monotonic() - last_write)
            if gap > 0 and stop.wait(gap):
                return
            self._dirty.clear()
            last_write, cpu = time.monotonic(), time.thread_time()
            try:
                self.publish()
                spacing = max(MIN_PUBLISH_GAP_SECONDS, PUBLISH_CPU_FACTOR * (time.thread_time() - cpu))
            except OSError as exc:
                if str(exc) != problem:
                    log.error("cannot write state: %s", exc)
                problem = str(exc)
                continue
            if problem is not None:
                log.info("state is written again")
                problem = None

    def _row(self, state: ReplicaState) -> ReplicaRow:
        key, container = state.key, state.container
        row = ReplicaRow(
            group=key.group,
            replica_num=key.replica_num,
            deployment_num=key.deployment_num,
            config_hash=container.config_hash if container else self.facts.config_hash,
            status=state.phase.status,
            phase=state.phase.value,
            ready=state.ready,
            message=state.message or ("waiting for the agent" if container is None else None),
            probes=state.probes,
        )
        if container is None:
            return row
        row = replace(
            row,
            container_id=container.id,
            container_name=container.name,
            host_port=container.host_port,
            url=f"http://127.0.0.1:{container.host_port}" if container.host_port else None,
            submitted_at=container.started_at,
            gpus=self._sources.gpu_rows(container.gpu_uuids),
        )
        if state.phase is Phase.FAILED:
            reason = "ran out of memory (OOM killed)" if container.oom_killed else None
            return replace(
                row,
                exit_code=container.exit_code,
                message=state.message or reason or f"exited with code {container.exit_code}",
                log_tail=self._sources.log_tail(container.id, key.deployment_num),
            )
        if state.phase is Phase.PROVISIONING:
            return replace(row, message=f"container {container.docker_status}")
        return replace(row, message=self._live_message(state), restarts=self._restarts(state)[0])

    def _restarts(self, state: ReplicaState) -> tuple[int, str]:
        return self.facts.restarts.get(state.key, (0, ""))

    def _live_message(self, state: ReplicaState) -> str | None:
        if state.message:
            return state.message
        assert state.container is not None
        if state.container.docker_status == "paused":
            return "paused (docker pause): it cannot answer until unpaused"
        count, last = self._restarts(state)
        if count:
            return f"replaced {count_of(count, 'time')} (last: {last})"
        return None


def _without_check_times(document: dict[str, Any]) -> dict[str, Any]:
    return {
        **document,
        "replicas": [
            {**row, "probes": [{**p, "last_checked_at": None} for p in row["probes"]]}
            for row in document["replicas"]
        ],
    }
