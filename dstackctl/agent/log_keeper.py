"""Copies each replica container's output into the service folder (see kept_logs.py).

One thread per container follows Docker's log stream (with timestamps) until the container
stops or the agent exits; a restarted agent resumes after the last line it kept. Every env
value of the replica's deployment (4 characters or more) is masked as `ps` masks log tails.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dstackctl.docker import DockerEngine, DockerError
from dstackctl.kept_logs import (
    KEEP_CONTAINERS,
    MAX_BYTES,
    file_name,
    kept_logs,
    masked,
    secret_masks,
    stamped,
)
from dstackctl.replica import Replica

log = logging.getLogger("dstackctl.agent")

Secrets = Callable[[Replica], dict[str, str]]


class LogKeeper:
    def __init__(self, folder: Path, secrets: Secrets) -> None:
        self._folder = folder
        self._secrets = secrets
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def follow(self, engine: DockerEngine, containers: list[Replica]) -> None:
        """Keep the output of every container not followed yet (stopped ones: what is left)."""
        with self._lock:
            present = {replica.id for replica in containers}
            for gone in [
                cid for cid, thread in self._threads.items() if cid not in present and not thread.is_alive()
            ]:
                del self._threads[gone]
            for replica in containers:
                current = self._threads.get(replica.id)
                if current is not None and (current.is_alive() or replica.status != "running"):
                    continue
                thread = threading.Thread(
                    target=self._copy, args=(engine, replica), name=f"logs-{replica.id[:12]}", daemon=True
                )
                self._threads[replica.id] = thread
                thread.start()

    def close(self, timeout: float = 0.5) -> None:
        """Stop following; a follower blocked on a quiet container is left behind (a daemon
        thread) after `timeout` in all, so that `stop` does not wait on every replica in turn."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _copy(self, engine: DockerEngine, replica: Replica) -> None:
        path = self._folder / file_name(
            replica.group, replica.replica_num, replica.deployment_num, replica.id
        )
        last = _last_stamp(path)
        masks = secret_masks(self._secrets(replica))
        try:
            self._folder.mkdir(mode=0o700, exist_ok=True)
            stream = engine.logs(replica.id, follow=True, stop=self._stop, timestamps=True)
            handle = _open(path)
            try:
                for line in stream:
                    parts = stamped(line)
                    if parts is None or (last is not None and parts[0] <= last):
                        continue  # kept before the agent restarted
                    handle.write(parts[0] + b" " + masked(parts[1], masks))
                    handle.flush()
                    if handle.tell() > MAX_BYTES:
                        handle.close()
                        os.replace(path, path.with_name(path.name + ".1"))
                        handle = _open(path)
            finally:
                handle.close()
        except (DockerError, OSError) as exc:
            log.warning("keeping the output of %s stopped: %s", replica.name, getattr(exc, "message", exc))
        _prune(self._folder)


def _open(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "ab")


def _last_stamp(path: Path) -> bytes | None:
    """The timestamp of the last line already kept (a restarted agent resumes after it)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 64 * 1024))
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        parts = stamped(line + b"\n")
        if parts is not None:
            return parts[0]
    return None


def _prune(folder: Path) -> None:
    """Keep the files of the newest KEEP_CONTAINERS containers."""
    logs = kept_logs(folder)
    for old in logs[: max(0, len(logs) - KEEP_CONTAINERS)]:
        for part in (old.path, old.path.with_name(old.path.name + ".1")):
            part.unlink(missing_ok=True)
