"""Reading a service's logs: Docker for the containers that exist, the files the agent kept
(kept_logs.py) for those that are gone; following the service through the kept files, so that
replicas that replace others join the stream until the service stops."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from dstackctl.errors import DstackctlError, NoSuchService
from dstackctl.kept_logs import LOGS_DIR, KeptLog, Masks, kept_logs, masked, secret_masks, stamped, text_of
from dstackctl.labels import DEFAULT_GROUP, service_labels
from dstackctl.store import SECRETS, SPEC, Store

if TYPE_CHECKING:
    from dstackctl.docker import DockerEngine

FOLLOW_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class LogSource:
    label: str  # `replica=0`, `group=workers replica=0`, `... deployment=1` when it tells apart
    group: str
    replica_num: int
    deployment_num: int
    container_id: str | None = None  # exists in Docker: read from Docker
    kept: KeptLog | None = None  # gone: read from the kept file


@dataclass(frozen=True)
class Filter:
    replica: int | None = None
    group: str | None = None
    since: float | None = None  # epoch seconds

    def wants(self, group: str, replica_num: int) -> bool:
        return (self.replica is None or replica_num == self.replica) and self.group in (None, group)


def log_sources(store: Store, name: str, engine: DockerEngine | None, only: Filter) -> list[LogSource]:
    """Every container of the service with output: existing ones (from Docker) and kept ones."""
    if not store.exists(name):
        raise NoSuchService(name)
    entries: dict[str, tuple[str, int, int, str | None, KeptLog | None]] = {}
    for kept_log in kept_logs(store.service_dir(name) / LOGS_DIR):
        entries[kept_log.container] = (
            kept_log.group,
            kept_log.replica_num,
            kept_log.deployment_num,
            None,
            kept_log,
        )
    for container in engine.list_replicas(service_labels(name, store.home)) if engine else []:
        short = container.id[:12]
        entries[short] = (
            container.group,
            container.replica_num,
            container.deployment_num,
            container.id,
            None,
        )
    found = sorted(e for e in entries.values() if only.wants(e[0], e[1]))
    if not found:
        raise DstackctlError(_nothing(name, only, bool(entries)))
    grouped = any(group != DEFAULT_GROUP for group, *_ in found)
    per_slot: dict[tuple[str, int], int] = {}
    for group, num, *_ in found:
        per_slot[(group, num)] = per_slot.get((group, num), 0) + 1
    sources = []
    for group, num, deployment, container_id, kept in found:
        label = _label(group, num, grouped)
        if per_slot[(group, num)] > 1:
            label += f" deployment={deployment}"
        sources.append(LogSource(label, group, num, deployment, container_id, kept))
    return sources


def _label(group: str, replica_num: int, grouped: bool) -> str:
    """In a service with groups every source names its group (an unnamed first group is `0`)."""
    return f"group={group} replica={replica_num}" if grouped else f"replica={replica_num}"


def _nothing(name: str, only: Filter, any_output: bool) -> str:
    if only.replica is not None or only.group is not None:
        which = " ".join(
            part
            for part in (
                f"group={only.group}" if only.group is not None else "",
                f"replica={only.replica}" if only.replica is not None else "",
            )
            if part
        )
        return f"{name} has no container for {which}"
    return f"{name} has no output kept yet" if not any_output else f"{name} has no output"


def secret_values(store: Store, name: str) -> Masks:
    """The service's env values: masked in what `logs` prints of a live container, as the
    agent masks what it keeps."""
    secrets = store.read(name, SECRETS) or {}
    return secret_masks(secrets.get("env") or {}, secrets.get("previous_env") or {})


def iter_logs(
    engine: DockerEngine | None,
    sources: list[LogSource],
    tail: int | None,
    since: float | None,
    masks: Masks,
) -> Iterator[tuple[str, bytes]]:
    """The lines of every source, one source after the other."""
    cutoff = _stamp(since) if since is not None else None
    for source in sources:
        if source.container_id is not None and engine is not None:
            for line in engine.logs(source.container_id, tail=tail, since=since):
                yield source.label, masked(line, masks)
            continue
        assert source.kept is not None
        lines = [
            line for line in source.kept.lines() if cutoff is None or (stamped(line) or (b"",))[0] >= cutoff
        ]
        for line in lines[-tail:] if tail else ([] if tail == 0 else lines):
            yield source.label, text_of(line)


def follow_service(store: Store, name: str, only: Filter, tail: int | None) -> Iterator[tuple[str, bytes]]:
    """`logs -f`: the kept files of the service, new containers joining as the agent starts
    keeping them, until the service is stopped (and its agent has finished writing)."""
    folder = store.service_dir(name) / LOGS_DIR
    offsets: dict[str, int] = {}
    cutoff = _stamp(only.since) if only.since is not None else None
    first = True
    while True:
        running = _running(store, name)
        logs = [log for log in kept_logs(folder) if only.wants(log.group, log.replica_num)]
        grouped = any(log.group != DEFAULT_GROUP for log in logs)
        for log in logs:
            label = _label(log.group, log.replica_num, grouped)
            yield from ((label, line) for line in _new_lines(log, offsets, tail if first else None, cutoff))
        first = False
        if not running:
            return
        time.sleep(FOLLOW_POLL_SECONDS)


def _new_lines(log: KeptLog, offsets: dict[str, int], tail: int | None, cutoff: bytes | None) -> list[bytes]:
    key = log.path.name
    try:
        with open(log.path, "rb") as handle:
            size = handle.seek(0, 2)
            start = offsets.get(key, 0)
            if start > size:  # rotated: start the new file from its beginning
                start = 0
            handle.seek(start)
            data = handle.read()
    except OSError:
        return []
    complete = data[: data.rfind(b"\n") + 1]
    offsets[key] = start + len(complete)
    lines = [line for line in complete.splitlines(keepends=True) if cutoff is None or line[:30] >= cutoff]
    if tail is not None and start == 0:
        lines = lines[-tail:] if tail else []
    return [text_of(line) for line in lines]


def _running(store: Store, name: str) -> bool:
    spec = store.read(name, SPEC) or {}
    return spec.get("desired") == "running" or store.agent_alive(name)


def _stamp(epoch: float) -> bytes:
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.").encode() + f"{moment.microsecond:06d}000Z".encode()
