"""Reading the logs of a service's replicas from Docker."""

from __future__ import annotations

from collections.abc import Iterator

from dstackctl.docker import DockerEngine
from dstackctl.errors import DstackctlError, NoSuchService
from dstackctl.labels import DEFAULT_GROUP, service_labels
from dstackctl.store import Store


def log_sources(store: Store, name: str, engine: DockerEngine, replica: int | None) -> list[tuple[str, str]]:
    """(name, container_id) of the service's containers, in group and replica order; the name
    is `replica=N`, or `group=G replica=N` in a service with replica groups."""
    if not store.exists(name):
        raise NoSuchService(name)
    containers = engine.list_replicas(service_labels(name, store.home))
    found = sorted((c.group, c.replica_num, c.deployment_num, c.id) for c in containers)
    if replica is not None:
        found = [f for f in found if f[1] == replica]
        if not found:
            raise DstackctlError(f"{name} has no container for replica={replica}")
    if not found:
        raise DstackctlError(f"{name} has no containers (it was stopped, so its logs are gone)")
    grouped = any(group != DEFAULT_GROUP for group, *_ in found)
    return [(f"group={g} replica={num}" if grouped else f"replica={num}", cid) for g, num, _, cid in found]


def iter_logs(
    engine: DockerEngine, sources: list[tuple[str, str]], tail: int | None, follow: bool
) -> Iterator[tuple[str, bytes]]:
    """Lines of every source; with several sources and `follow`, interleaved as they come."""
    if len(sources) == 1 or not follow:
        for num, cid in sources:
            for line in engine.logs(cid, tail=tail, follow=follow):
                yield num, line
        return
    import queue
    import threading

    lines: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=1000)
    stop = threading.Event()

    def pump(num: str, cid: str) -> None:
        try:
            for line in engine.logs(cid, tail=tail, follow=True, stop=stop):
                lines.put((num, line))
        finally:
            lines.put(None)

    threads = [threading.Thread(target=pump, args=s, daemon=True) for s in sources]
    for thread in threads:
        thread.start()
    open_streams = len(threads)
    try:
        while open_streams:
            item = lines.get()
            if item is None:
                open_streams -= 1
            else:
                yield item
    finally:
        stop.set()
