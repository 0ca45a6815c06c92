"""What a published row needs from Docker and nvidia-smi: a failed replica's last log lines
(secrets masked) and the GPUs a replica holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dstackctl.agent.desired import Desired
from dstackctl.agent.provisioning import Provisioner
from dstackctl.docker import DockerEngine
from dstackctl.gpus import discover
from dstackctl.kept_logs import masked, secret_masks

LOG_TAIL_LINES = 5


class RowLookups:
    def __init__(
        self,
        engine: Callable[[], DockerEngine | None],
        desired: Callable[[], Desired | None],
        provisioner: Provisioner,
    ) -> None:
        self._engine = engine
        self._desired = desired
        self._provisioner = provisioner
        self._tails: dict[str, tuple[str, ...]] = {}  # a stopped container's log no longer changes

    def log_tail(self, container_id: str, deployment_num: int) -> tuple[str, ...]:
        tail = self._tails.get(container_id)
        engine = self._engine()
        if tail is None and engine is not None:
            desired = self._desired()
            env: dict[str, str] = {}
            if desired is not None:
                deployments = (desired.current, desired.previous)
                env = next((d.env for d in deployments if d and d.number == deployment_num), {})
            tail = tuple(redact(engine.tail_text(container_id, LOG_TAIL_LINES), env))
            self._tails[container_id] = tail
        return tail or ()

    def gpu_rows(self, uuids: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
        if not uuids:
            return ()
        if self._provisioner.gpus is None:
            self._provisioner.gpus = discover()
        known = {g.uuid: g for g in self._provisioner.gpus}
        return tuple(known[u].to_json() if u in known else {"uuid": u} for u in uuids)


def redact(lines: list[str], env: dict[str, str]) -> list[str]:
    """Each line with the env values masked (kept_logs.secret_masks), cut at 300."""
    masks = secret_masks(env)
    return [masked(line.encode(), masks).decode(errors="replace")[:300] for line in lines]
