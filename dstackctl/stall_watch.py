"""Which replicas look hung: requests wait on them for the head of an answer, and none came.

A hung replica (`docker pause`, a deadlocked server) still accepts connections (Docker's proxy,
or the kernel, completes them), so only silence gives it away, and a replica busy with long
answers is silent too. Silence is therefore only a suspicion: the endpoint reports a replica
on which a request has waited SUSPECT_AFTER_SECONDS with no head of any answer since, and the
agent runs that replica's own probes at once; a probe that fails confirms the hang and the
replica leaves the rotation, long before three scheduled probes would have failed.

Requests that wait on a replica when it is ejected and can be sent again without harm (GET,
HEAD or OPTIONS without a body, their client still waiting) are abandoned there and sent to
another replica.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

SUSPECT_AFTER_SECONDS = 5.0


@dataclass
class Waiting:
    """A request waiting on a replica for the head of its answer."""

    since: float
    task: asyncio.Task[object] | None  # cancelled when it is abandoned (resend only)
    resend: bool  # safe to send to another replica
    abandoned: bool = False


class StallWatch:
    """Lives in the endpoint's loop: no locks."""

    def __init__(self, after: float = SUSPECT_AFTER_SECONDS) -> None:
        self.after = after
        self._waiting: dict[str, dict[int, Waiting]] = {}
        self._answered: dict[str, float] = {}  # when each replica last sent the head of an answer
        self._reported: dict[str, float] = {}
        self._tokens = itertools.count()

    def wait(
        self, key: str, now: float, task: asyncio.Task[object] | None, resend: bool
    ) -> tuple[int, Waiting]:
        """The request of `task` waits on `key` from `now`. Where it can go elsewhere (`resend`),
        abandoning it marks the entry and cancels the task: no task or event per request
        (racing one cost a fifth of the endpoint's CPU per request)."""
        token = next(self._tokens)
        entry = Waiting(now, task, resend)
        self._waiting.setdefault(key, {})[token] = entry
        return token, entry

    def done(self, key: str, token: int, answered_at: float | None) -> None:
        """The request stopped waiting; `answered_at`: when the head of its answer came."""
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.pop(token, None)
            if not waiting:
                del self._waiting[key]
        if answered_at is not None:
            self._answered[key] = answered_at

    def suspects(self, now: float) -> list[str]:
        """Replicas with a request waiting `after` seconds and no answer since it began;
        each reported at most once per `after` seconds."""
        found = []
        for key, waiting in self._waiting.items():
            oldest = min(entry.since for entry in waiting.values())
            quiet_since = max(oldest, self._answered.get(key, oldest))
            if now - quiet_since >= self.after and now - self._reported.get(key, -self.after) >= self.after:
                self._reported[key] = now
                found.append(key)
        return found

    def abandon(self, key: str) -> int:
        """Send the requests waiting on `key` that can be sent again elsewhere; how many."""
        moved = [
            entry for entry in self._waiting.get(key, {}).values() if entry.resend and not entry.abandoned
        ]
        for entry in moved:
            entry.abandoned = True
            if entry.task is not None:
                entry.task.cancel()
        return len(moved)

    def forget(self, keep: set[str]) -> None:
        for table in (self._answered, self._reported):
            for key in [k for k in table if k not in keep]:
                del table[key]
