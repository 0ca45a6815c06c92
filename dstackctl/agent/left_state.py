"""What the previous agent of a service left in state.json, read once by a (re)started agent.

A restarted agent carries on from it: the rollout under way, the autoscaled counts, and which
replicas were in the endpoint's rotation, so that the endpoint serves them again at once
instead of waiting for `ready_after` fresh probe successes. The first probe results correct
what was carried; a container that is gone or was replaced is not found here.
"""

from __future__ import annotations

import functools

from dstackctl.status import GroupScaling, ObservedState, ProbeView, RolloutStatus
from dstackctl.store import STATE, Store, StoreError


class LeftState:
    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self._name = name

    @functools.cached_property
    def _state(self) -> ObservedState:
        try:
            return ObservedState.from_json(self._store.read(self._name, STATE) or {})
        except StoreError:
            return ObservedState.from_json({})

    @property
    def rollout(self) -> RolloutStatus | None:
        return self._state.rollout

    def scaling(self, run_id: str | None) -> dict[str, GroupScaling]:
        """The autoscaled counts, unless the state was left by another run of this name."""
        return self._state.scaling if self._state.run_id == run_id else {}

    def ready_probes(self, container_id: str, run_id: str | None) -> tuple[ProbeView, ...] | None:
        """The probe views of a container that was in the rotation; None when it was not."""
        return self._ready.get(container_id) if self._state.run_id == run_id else None

    @functools.cached_property
    def _ready(self) -> dict[str, tuple[ProbeView, ...]]:
        rows = self._state.replicas
        return {row.container_id: row.probes for row in rows if row.container_id and row.ready}
