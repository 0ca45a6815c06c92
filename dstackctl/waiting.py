"""Waiting for an outcome (`run`, `run -d`, `redeploy`), from observed state alone.

The agent says which deployment of the spec it has observed, which it serves and how the
rollout went; a waiter reads that and nothing else, as `kubectl rollout status` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from dstackctl.errors import ExitCode, NoSuchService
from dstackctl.runs import RunView, view
from dstackctl.status import ReplicaRow
from dstackctl.store import Store
from dstackctl.wording import count_of

AGENT_START_GRACE_SECONDS = 5.0  # a just-started agent needs a moment to take its lock
# A state that stays stale this long while we wait: its agent is stopped or cannot write.
STALE_WAIT_SECONDS = 10.0


@dataclass
class Outcome:
    exit_code: ExitCode
    message: str
    view: RunView | None


def _changed(last: RunView | None, current: RunView) -> bool:
    return last is None or current.replicas != last.replicas or current.status != last.status


def wait_ready(
    store: Store,
    name: str,
    timeout: float,
    on_change: Callable[[RunView], None] = lambda _: None,
    poll: float = 0.02,
) -> Outcome:
    """Wait until every replica is running and ready, one fails, the agent dies, or time runs out."""

    def timed_out(current: RunView) -> Outcome:
        return Outcome(ExitCode.NOT_READY, _timeout_message(name, current, timeout), current)

    return _wait(store, name, timeout, lambda current: _readiness(name, current), timed_out, on_change, poll)


def _wait(
    store: Store,
    name: str,
    timeout: float,
    verdict: Callable[[RunView], Outcome | None],
    timed_out: Callable[[RunView], Outcome],
    on_change: Callable[[RunView], None],
    poll: float,
) -> Outcome:
    """Poll the service's view until `verdict` gives an outcome, its agent has exited, or
    `timeout` seconds have passed; `on_change` sees each view that differs from the last."""
    deadline = time.monotonic() + timeout
    agent_grace = time.monotonic() + AGENT_START_GRACE_SECONDS
    last: RunView | None = None
    stale_since: float | None = None
    while True:
        current = view(store, name)
        if current is None:
            raise NoSuchService(name)
        if _changed(last, current):
            on_change(current)
        last = current
        stale_for = current.stale_for  # what a hung agent left says nothing about now
        outcome = verdict(current) if stale_for is None else None
        if outcome is not None:
            return outcome
        if not current.agent_alive and time.monotonic() > agent_grace:
            return Outcome(
                ExitCode.FAILED, f"the agent of {name} exited; see {store.log_path(name)}", current
            )
        stale_since = None if stale_for is None else stale_since or time.monotonic()
        if stale_for is not None and stale_since and time.monotonic() - stale_since > STALE_WAIT_SECONDS:
            return _stale(store, name, stale_for, current)
        if time.monotonic() >= deadline:
            return timed_out(current)
        time.sleep(poll)


def _stale(store: Store, name: str, age: float, current: RunView) -> Outcome:
    return Outcome(
        ExitCode.FAILED,
        f"the agent of {name} has not written its state for {int(age)}s, so whether it is ready is "
        f"unknown; see {store.log_path(name)}, and `dstackctl stop {name}` then `dstackctl run` again",
        current,
    )


def _readiness(name: str, current: RunView) -> Outcome | None:
    """Ready, failed, or None (not yet) for the spec's deployment as the agent observed it."""
    observed = current.observed
    if current.endpoint_error:
        return Outcome(ExitCode.FAILED, f"{name}: {current.endpoint_error}", current)
    if observed.observed_deployment != current.spec.current.number or observed.deployment_num is None:
        return None  # the agent has not acted on this spec yet
    if observed.target_replicas != _replicas_asked(current):
        return None  # the agent has not yet seen the new replica count (scale in place)
    rows = observed.rows_of(observed.deployment_num)
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        return Outcome(ExitCode.FAILED, _failure_message(name, failed), current)
    wanted = observed.target_replicas or 0
    ready = [r for r in rows if r.running_and_ready]
    port = current.spec.endpoint_port  # a moved endpoint is up once it serves on the new port
    endpoint_up = port is None or (current.url is not None and current.url.endswith(f":{port}"))
    if len(current.replicas) == wanted and len(ready) == wanted and endpoint_up:
        scales = f"; autoscaled within {current.replica_range}" if current.replica_range else ""
        return Outcome(
            ExitCode.OK, f"{name} is ready ({wanted} of {count_of(wanted, 'replica')}{scales})", current
        )
    return None


def _replicas_asked(current: RunView) -> int | None:
    """The replica count the spec asks of the deployment the agent serves."""
    spec, number = current.spec, current.observed.deployment_num
    scaled = current.scaling  # autoscaled groups: the count the agent decided
    for record in (spec.current, spec.previous):
        if record is not None and record.number == number:
            counts = record.group_counts
            return sum(scaled[g].desired if g in scaled else n for g, n in counts.items())
    return None


def wait_rollout(
    store: Store,
    name: str,
    number: int,
    deadline: float,
    on_change: Callable[[RunView], None] = lambda _: None,
    poll: float = 0.2,
) -> Outcome:
    """Wait for the rollout to deployment `number` to end: done (exit 0), rolled back or
    failed (exit 1)."""

    def timed_out(current: RunView) -> Outcome:
        state = current.rollout.state if current.rollout else "not started"
        return Outcome(
            ExitCode.FAILED,
            f"the redeploy of {name} is still {state.replace('_', ' ')} after {deadline:g}s; "
            f"the agent carries on (`dstackctl ps -v {name}`)",
            current,
        )

    return _wait(
        store,
        name,
        deadline,
        lambda current: _rollout_verdict(name, number, current),
        timed_out,
        on_change,
        poll,
    )


def _rollout_verdict(name: str, number: int, current: RunView) -> Outcome | None:
    rollout = current.rollout
    if rollout is None or rollout.to_deployment != number:
        return None
    if rollout.state == "done":
        replicas = current.observed.target_replicas or 0
        return Outcome(
            ExitCode.OK, f"{name} now runs deployment {number} ({count_of(replicas, 'replica')})", current
        )
    if rollout.state == "rolled_back":
        return Outcome(
            ExitCode.FAILED,
            f"the redeploy of {name} failed and was rolled back to deployment "
            f"{rollout.from_deployment}: {rollout.reason}",
            current,
        )
    if rollout.state == "rollback_failed":
        return Outcome(ExitCode.FAILED, f"{name}: {rollout.reason}", current)
    return None


def _failure_message(name: str, failed: list[ReplicaRow]) -> str:
    """One line per distinct reason: `replica=0, replica=1 failed: ...`, then log tails."""
    by_reason: dict[str, list[ReplicaRow]] = {}
    for row in failed:
        by_reason.setdefault(row.message or "unknown reason", []).append(row)
    parts = []
    for reason, rows in by_reason.items():
        who = ", ".join(r.name for r in rows)
        text = f"{who} failed: {reason}"
        tail = next((r.log_tail for r in rows if r.log_tail), None)
        if tail:
            text += "; last log lines:\n    " + "\n    ".join(tail)
        parts.append(text)
    return f"{name}: " + "\n".join(parts)


def _timeout_message(name: str, current: RunView, timeout: float) -> str:
    waiting = [r.describe() for r in current.replicas if not r.running_and_ready] or [
        "no replica reported yet"
    ]
    return (
        f"{name} was not ready within {timeout:g}s: {', '.join(waiting)}; it keeps running "
        f"(`dstackctl ps -v {name}` shows why, `dstackctl stop {name}` removes it)"
    )
