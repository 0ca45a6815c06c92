"""Stopping a service, and rebuilding a lost record from its containers."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from dstackctl.agent.process import start_agent, stop_agent
from dstackctl.docker import DockerEngine
from dstackctl.errors import DstackctlError, NoSuchService
from dstackctl.labels import LABEL_SPEC, service_labels
from dstackctl.replica_spec import stop_grace_seconds
from dstackctl.store import SECRETS, SPEC, Store, StoreError


def stop_service(store: Store, name: str, engine: DockerEngine, abort: bool = False) -> int:
    """Stop the agent and every container of the service; keep the record. Returns containers
    removed. `abort`: SIGKILL at once, without the grace period (dstack's `stop --abort`)."""
    if not store.exists(name):
        raise NoSuchService(name)
    unrecorded = None
    try:
        try:
            store.update(name, SPEC, lambda spec: {**spec, "desired": "stopped"})
        except StoreError:
            # A corrupt or foreign record must not keep the containers alive: replace it.
            with store.lock(name):
                store.write(name, SPEC, {"name": name, "desired": "stopped", "deployment_num": 0})
    except OSError as exc:  # a full disk, a read-only folder: the containers stop all the same
        unrecorded = exc.strerror or str(exc)
    stop_agent(store, name)
    try:
        spec = store.read(name, SPEC) or {}
    except (OSError, StoreError):
        spec = {}
    grace = (spec.get("config") or {}).get("stop_duration")
    grace_seconds = 0 if abort else stop_grace_seconds(grace)
    containers = engine.list_replicas(service_labels(name, store.home))
    if containers:
        with ThreadPoolExecutor(max_workers=min(8, len(containers))) as pool:
            list(pool.map(lambda r: engine.stop_and_remove(r.id, grace_seconds), containers))
    engine.remove_networks(service_labels(name, store.home))
    if unrecorded is not None:
        raise DstackctlError(
            f"stopped {name} ({len(containers)} containers removed, its agent too), but could not "
            f"record it in {store.service_dir(name)} ({unrecorded}); free space or fix its "
            f"permissions, then `dstackctl stop {name}` again so that `ps` shows it stopped"
        )
    return len(containers)


def recover_service(store: Store, name: str, engine: DockerEngine) -> tuple[str, int]:
    """Rebuild spec.json and secrets.json from the labels and env of the service's newest
    container, then restart its agent. Returns (container name, deployment number)."""
    containers = engine.list_replicas(service_labels(name, store.home))
    labelled = [c for c in containers if c.labels.get(LABEL_SPEC)]
    if not labelled:
        raise DstackctlError(
            f"no container of {name} is left to rebuild its record from; "
            f"start it again with `dstackctl run -f FILE`"
        )
    newest = max(labelled, key=lambda c: (c.status == "running", c.deployment_num, c.name))
    try:
        record = json.loads(newest.labels[LABEL_SPEC])
    except ValueError:
        raise DstackctlError(f"the spec label of container {newest.name} is not JSON") from None
    names = [entry.partition("=")[0] for entry in (record.get("config") or {}).get("env") or []]
    environment = engine.environment(newest.id)
    env = {key: environment[key] for key in names if key in environment}
    stop_agent(store, name)
    with store.lock(name):
        store.write(name, SECRETS, {"env": env, "registry_auth": None})
        store.write(name, SPEC, {**record, "desired": "running", "previous": None, "rollout": None})
    start_agent(store, name)
    return newest.name, int(record.get("deployment_num", 0))
