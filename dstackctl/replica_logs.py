"""Reading the logs of a service's replicas from Docker."""

from __future__ import annotations

from collections.abc import Iterator

from dstackctl.docker import DockerEngine
from dstackctl.errors import DstackctlError, NoSuchService
from dstackctl.labels import service_labels
from dstackctl.store import Store


def log_sources(store: Store, name: str, engine: DockerEngine, replica: int | None) -> list[tuple[int, str]]:
    """(replica_num, container_id) of the service's containers, in replica order."""
    if not store.exists(name):
        raise NoSuchService(name)
    containers = engine.list_replicas(service_labels(name, store.home))
    found = sorted((c.replica_num, c.deployment_num, c.id) for c in containers)
    if replica is not None:
        found = [f for f in found if f[0] == replica]
        if not found:
            raise DstackctlError(f"{name} has no container for replica={replica}")
    if not found:
        raise DstackctlError(f"{name} has no containers (it was stopped, so its logs are gone)")
    return [(num, cid) for num, _, cid in found]


def iter_logs(
    engine: DockerEngine, sources: list[tuple[int, str]], tail: int | None, follow: bool
) -> Iterator[tuple[int, bytes]]:
    """Lines of every source; with several sources and `follow`, interleaved as they come."""
    if len(sources) == 1 or not follow:
        for num, cid in sources:
            for line in engine.logs(cid, tail=tail, follow=follow):
                yield num, line
        return
    import queue
    import threading

    lines: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=1000)
    stop = threading.Event()

    def pump(num: int, cid: str) -> None:
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
