"""The outcome of a rollout, which the agent alone decides and publishes.

The CLI asks for a rollout by bumping the spec's deployment number (with a `rollout`
request naming the deployment it replaces, kept as `previous`). The agent follows it:
done once every replica of the new deployment is ready and nothing old is left; rolled
back when a new replica fails or is not ready within the request's timeout. Rolling back
makes the previous deployment the target again; the spec is never rewritten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from dstackctl.agent.desired import Deployment, Desired
from dstackctl.agent.rollout_plan import Plan, Slot, slot_name
from dstackctl.status import RolloutStatus
from dstackctl.timeutil import utc_now

log = logging.getLogger("dstackctl.agent")


class RolloutMonitor:
    def __init__(self, status: RolloutStatus | None) -> None:
        self.status = status  # as the last agent published it: a restart carries on
        self._waiting_since: dict[str, float] = {}

    @property
    def active(self) -> bool:
        """A rollout (or its rollback) is under way."""
        return self.status is not None and self.status.active

    def target(self, desired: Desired) -> Deployment:
        """The deployment to converge to: the spec's, or the previous one after a rollback."""
        self._begin(desired)
        status = self.status
        rolled_back = (
            status is not None
            and status.to_deployment == desired.current.number
            and status.state in ("rolling_back", "rolled_back", "rollback_failed")
        )
        if rolled_back and desired.previous is not None:
            return desired.previous
        return desired.current

    def _begin(self, desired: Desired) -> None:
        request = desired.spec.rollout
        if request is None or request.to_deployment != desired.current.number:
            return
        if self.status is not None and self.status.to_deployment == request.to_deployment:
            return
        log.info("rollout to deployment %d started", request.to_deployment)
        self.status = RolloutStatus(
            state="in_progress",
            from_deployment=request.from_deployment,
            to_deployment=request.to_deployment,
            started_at=request.started_at or utc_now(),
        )
        self._waiting_since.clear()

    def follow(
        self,
        desired: Desired,
        steps: Plan,
        why_failed: Callable[[Slot], str],
        why_waiting: Callable[[str], tuple[str, str]],
    ) -> None:
        """After a reconcile round: finish, roll back, or keep waiting."""
        status = self.status
        if status is None or not status.active or status.to_deployment != desired.current.number:
            return
        if status.serving_at_start is None and status.state == "in_progress":
            status = self.status = replace(status, serving_at_start=tuple(steps.serving_old))
        if steps.complete:
            self._finish("done" if status.state == "in_progress" else "rolled_back")
            return
        if status.state == "rolling_back" and _restored_as_before(steps, status.serving_at_start):
            names = ", ".join(slot_name(slot) for slot in steps.unready)
            self._finish(
                "rolled_back",
                f"{status.reason}; deployment {status.from_deployment} is back as it was, "
                f"{names} not ready (not ready before the rollout either)",
            )
            return
        timeout = desired.spec.rollout.timeout if desired.spec.rollout else 0
        failure = self._failure(steps, status.serving_deployment, timeout, why_failed, why_waiting)
        if failure is None:
            return
        if status.state == "in_progress":
            log.warning("rollout failed (%s); rolling back", failure)
            self.status = replace(status, state="rolling_back", reason=failure)
            self._waiting_since.clear()
        else:
            cause = f"{status.reason}; " if status.reason else ""
            self._finish("rollback_failed", f"{cause}the rollback failed too: {failure}")

    def _failure(
        self,
        steps: Plan,
        number: int,
        timeout: int,
        why_failed: Callable[[Slot], str],
        why_waiting: Callable[[str], tuple[str, str]],
    ) -> str | None:
        for slot in steps.failed:
            return f"{slot_name(slot)} (deployment {number}) failed: {why_failed(slot)}"
        now = time.monotonic()
        for key in steps.waiting_for:
            since = self._waiting_since.setdefault(key, now)
            if timeout and now - since > timeout:
                which, detail = why_waiting(key)
                return f"{which} (deployment {number}) was not ready within {timeout}s{detail}"
        return None

    def _finish(self, state: str, reason: str | None = None) -> None:
        assert self.status is not None
        log.info("rollout %s%s", state, f": {reason}" if reason else "")
        self.status = replace(
            self.status, state=state, reason=reason or self.status.reason, finished_at=utc_now()
        )
        self._waiting_since.clear()


def _restored_as_before(steps: Plan, serving_at_start: tuple[Slot, ...] | None) -> bool:
    """The rollback has put back every replica of the previous deployment, and those that were
    in rotation when the rollout began are ready again: the others were not ready then either."""
    if serving_at_start is None or not steps.in_place:
        return False
    return not set(steps.unready) & set(serving_at_start)
