"""Keeps an SMG router group's worker list equal to the ready replicas of the other groups.

dstack's ServiceRouterWorkerSyncWorker (server/background/.../service_router_worker_sync.py of
dstack 0.22.5) re-syncs every few seconds whatever changed; here a sync runs when the set of
ready workers or the router's container changes, and at least every RESYNC_SECONDS so that a
router that restarted (and forgot its workers) gets them back. Syncs run on a thread of their
own: a router that does not answer must not hold up the reconcile loop. `dynamo` routers are
left alone (their workers find them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from dstackctl.agent.router_sync import RouterSync, Worker
from dstackctl.replica import Replica

if TYPE_CHECKING:
    from dstackctl.agent.desired import Deployment
    from dstackctl.agent.phases import ReplicaBook

RESYNC_SECONDS = 5.0

log = logging.getLogger("dstackctl.agent")


class RouterWorkers:
    def __init__(self, resync_seconds: float = RESYNC_SECONDS) -> None:
        self._sync = RouterSync()
        self._resync_seconds = resync_seconds
        self._last: tuple[str, frozenset[Worker]] | None = None
        self._last_at = 0.0
        self._running: threading.Thread | None = None
        self.error: str | None = None  # the last sync's problem, for the log and `ps`

    def follow(self, target: Deployment, containers: list[Replica], book: ReplicaBook) -> None:
        """After a reconcile round: an SMG router group gets the other groups' ready replicas."""
        group = target.config.router_group
        if group is None or group.router is None or group.router.type != "smg":
            return
        by_id = {c.id: c for c in containers}
        router = next(
            (
                c
                for c in containers
                if c.group == group.name and c.status == "running" and target.owns_replica(c)
            ),
            None,
        )
        workers = [
            (by_id[s.container.id], f"{s.key.group}/{s.key.replica_num}/{s.key.deployment_num}")
            for s in book.replicas()
            if s.ready and s.container is not None and s.key.group != group.name and s.container.id in by_id
        ]
        self.tick(router, workers)

    def tick(self, router: Replica | None, workers: Iterable[tuple[Replica, str]]) -> None:
        """`router`: the router group's running container (None: nothing to sync with);
        `workers`: each ready replica of the other groups with its key."""
        if router is None or router.host_port is None:
            return
        url = f"http://127.0.0.1:{router.host_port}"
        wanted = frozenset(
            Worker(key, f"http://{replica.ip_address}:{replica.container_port}")
            for replica, key in workers
            if replica.ip_address and replica.container_port
        )
        now = time.monotonic()
        if (url, wanted) == self._last and now - self._last_at < self._resync_seconds:
            return
        if self._running is not None and self._running.is_alive():
            return
        self._last, self._last_at = (url, wanted), now
        self._running = threading.Thread(
            target=self._run, args=(url, wanted), name="router-sync", daemon=True
        )
        self._running.start()

    def _run(self, url: str, wanted: frozenset[Worker]) -> None:
        result = self._sync.sync(url, wanted)
        for key in result.added:
            log.info("router: added worker %s", key)
        for key in result.removed:
            log.info("router: removed worker %s", key)
        if result.error and result.error != self.error:
            log.warning("router: %s", result.error)
        self.error = result.error

    def close(self) -> None:
        if self._running is not None:
            self._running.join(10)
