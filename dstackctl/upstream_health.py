"""Passive health: replicas that real requests found dead or hung leave the rotation at once.

Probes take a replica out only after their third failure in a row (about half a minute);
until then every request sent to a paused or crashed replica waits or fails. Here the
endpoint counts, per replica, the requests in a row that met a refused or reset connection or
the read timeout, and ejects the replica after `after` of them (never the last one in
rotation). It stays out until `readmit` (the agent calls it when the replica's probe passes).
"""

from __future__ import annotations

import threading
from collections.abc import Collection

# nginx, in front of dstack's gateway, marks a server down after one failure (max_fails=1)
# for 10 s; here the replica stays out until its probe passes, so one failure alone is not
# taken as proof: a replica restarting can refuse one connection.
EJECT_AFTER_FAILURES = 2


class Ejections:
    """Failures in a row per replica key, and the replicas ejected for them. Thread-safe:
    the endpoint's loop records, the agent's threads read and readmit."""

    def __init__(self, after: int = EJECT_AFTER_FAILURES) -> None:
        self._after = after
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._ejected: set[str] = set()

    def failed(self, key: str, rotation_size: int) -> int:
        """Note a failed request to `key`; returns the failures in a row when this one
        ejected it (there were `after` of them and `key` was not alone in rotation), else 0."""
        with self._lock:
            count = self._failures.get(key, 0) + 1
            self._failures[key] = count
            if count < self._after or rotation_size <= 1 or key in self._ejected:
                return 0
            self._ejected.add(key)
            del self._failures[key]
            return count

    def eject(self, key: str, rotation_size: int) -> bool:
        """Eject `key` now (its probe confirmed a hang); False when it is alone in rotation
        or out already."""
        with self._lock:
            if rotation_size <= 1 or key in self._ejected:
                return False
            self._ejected.add(key)
            self._failures.pop(key, None)
            return True

    def answered(self, key: str) -> None:
        if key in self._failures:  # a plain read first: this runs for every request
            with self._lock:
                self._failures.pop(key, None)

    def readmit(self, key: str) -> bool:
        """Take `key` back; False when it was not ejected."""
        with self._lock:
            self._failures.pop(key, None)
            if key not in self._ejected:
                return False
            self._ejected.discard(key)
            return True

    def keep_only(self, keys: Collection[str]) -> None:
        """Forget every replica not in `keys` (it left the routing table)."""
        with self._lock:
            self._ejected.intersection_update(keys)
            for key in [k for k in self._failures if k not in keys]:
                del self._failures[key]

    def is_ejected(self, key: str) -> bool:
        return key in self._ejected

    def ejected(self) -> set[str]:
        with self._lock:
            return set(self._ejected)
