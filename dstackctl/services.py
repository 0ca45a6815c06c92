"""Operations on services: submit (run), wait for an outcome, stop, and read logs."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dstackctl.config.loader import LoadedConfig
from dstackctl.docker import LABEL_HOME, LABEL_RUN, DockerEngine
from dstackctl.errors import DstackctlError, ExitCode, UsageError
from dstackctl.replica_spec import config_hash, home_label, stop_grace_seconds
from dstackctl.runs import RunView, describe_probes, start_agent, stop_agent, view
from dstackctl.store import SECRETS, SPEC, STATE, Store, StoreError
from dstackctl.timeutil import utc_now

_NAME_CHARS = re.compile(r"[^a-z0-9-]+")
DEFAULT_ROLLOUT_TIMEOUT = 600
ROLLOUT_ACTIVE = ("in_progress", "rolling_back")


class NoSuchService(DstackctlError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no service named {name}; `dstackctl ps -a` lists them", ExitCode.FAILED)


def run_name(loaded: LoadedConfig, override: str | None) -> str:
    """`-n`, else the config's `name`, else derived from the file name (`demo.dstack.yml` -> demo)."""
    if override:
        from dstackctl.config.models import RUN_NAME

        if not RUN_NAME.match(override):
            raise UsageError(
                f"{override!r} is not a valid run name: 2 to 41 characters, lower-case letters, "
                f"digits and '-', starting with a letter"
            )
        return override
    if loaded.config.name:
        return loaded.config.name
    stem = Path(loaded.file).name.split(".")[0].lower()
    candidate = _NAME_CHARS.sub("-", stem).strip("-")[:41]
    if not candidate or not candidate[0].isalpha():
        candidate = f"svc-{candidate}".strip("-")
    return candidate if len(candidate) >= 2 else "service"


def parse_env_overrides(pairs: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """`-e KEY=VAL` sets a value; `-e KEY` takes it from the caller's environment."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\Z", key):
            raise UsageError(f"-e {key!r}: expected KEY=VALUE or KEY with a valid variable name")
        if not sep:
            if key not in environ:
                raise UsageError(f"-e {key}: {key} is not set in your environment; use -e {key}=VALUE")
            value = environ[key]
        result[key] = value
    return result


def stored_config(loaded: LoadedConfig) -> dict[str, Any]:
    """The config as the store keeps it: env reduced to names, registry credentials removed."""
    data = loaded.config.model_dump(mode="json", exclude_unset=True)
    data["env"] = list(loaded.config.environment)
    data.pop("registry_auth", None)
    return data


@dataclass
class Submitted:
    name: str
    outcome: str  # "started", "unchanged", "scaled" or "rollout"
    agent_restarted: bool = False
    deployment_num: int = 0


@dataclass
class Release:
    """A configuration ready to be recorded: what the store keeps and what the agent needs."""

    config: dict[str, Any]
    config_hash: str
    replicas: int
    env: dict[str, str]
    probe_urls: list[str]

    @classmethod
    def of(cls, loaded: LoadedConfig, env_values: dict[str, str]) -> Release:
        full = loaded.config.model_dump(mode="json", exclude_unset=True)
        full.pop("replicas", None)  # a change of replicas alone scales in place
        return cls(
            config=stored_config(loaded),
            config_hash=config_hash(full, env_values),
            replicas=loaded.config.replicas,
            env=env_values,
            probe_urls=[probe.url for probe in loaded.config.effective_probes()],
        )


def gpu_plan(loaded: LoadedConfig, engine: DockerEngine | None) -> list[list[Any]] | None:
    """Which GPUs each replica would get now (None without a GPU request).

    Raises GpuError (exit 1) with what is missing, e.g. "needs 2 x 24GB..48GB for 2 replicas;
    found 1 x NVIDIA A10G 24GB".
    """
    from dstackctl.gpus import assign, discover

    spec = loaded.config.resources.gpu
    if spec is None or not spec.wants_gpus:
        return None
    taken = engine.gpus_in_use() if engine is not None else set()
    return assign(spec, discover(), loaded.config.replicas, taken)


def endpoint_port(loaded: LoadedConfig, override: int | None) -> int:
    port = loaded.config.port
    return override or port.local_port or port.container_port


def submit(
    store: Store,
    loaded: LoadedConfig,
    name: str,
    env_values: dict[str, str],
    port_override: int | None = None,
    rollout_timeout: int = DEFAULT_ROLLOUT_TIMEOUT,
) -> Submitted:
    """Record the desired spec and make sure the service's agent runs.

    A running service with the same config is left alone; with only `replicas` changed it
    scales in place; with any other change it gets a rolling update (as `redeploy -f`).
    """
    release = Release.of(loaded, env_values)
    with store.lock(name):
        spec = store.read(name, SPEC)
        running = spec is not None and spec.get("desired") == "running"
    if running:
        assert spec is not None
        if spec.get("config_hash") != release.config_hash:
            number = start_rollout(store, name, release, rollout_timeout)
            return Submitted(name, "rollout", deployment_num=number)
        outcome = "unchanged"
        if spec.get("replicas") != release.replicas:
            store.update(name, SPEC, lambda doc: {**doc, "replicas": release.replicas})
            outcome = "scaled"
        restarted = ensure_agent(store, name)
        return Submitted(name, outcome, agent_restarted=restarted, deployment_num=spec["deployment_num"])
    port = endpoint_port(loaded, port_override)
    from dstackctl.netutil import port_is_free

    if not port_is_free("127.0.0.1", port):
        raise DstackctlError(
            f"port {port} on 127.0.0.1 is in use by another program, and {name}'s endpoint needs it; "
            f"choose another with --port or `port: LOCAL:CONTAINER`"
        )
    registry_auth = None
    config = loaded.config
    if config.registry_auth:
        registry_auth = {
            "username": _expand_secret(config.registry_auth.username, env_values),
            "password": _expand_secret(config.registry_auth.password, env_values),
        }
    run_id = uuid.uuid4().hex[:12]
    with store.lock(name):
        store.write(name, SECRETS, {"env": env_values, "registry_auth": registry_auth})
        store.write(
            name,
            SPEC,
            {
                "name": name,
                "run_id": run_id,
                "desired": "running",
                "config": release.config,
                "config_file": str(Path(loaded.file).absolute()),
                "config_dir": str(Path(loaded.file).absolute().parent),
                "config_hash": release.config_hash,
                "deployment_num": 0,
                "replicas": release.replicas,
                "submitted_at": utc_now(),
                "probe_urls": release.probe_urls,
                "endpoint_port": port,
                "previous": None,
                "rollout": None,
            },
        )
        store.write(name, STATE, {"name": name, "run_id": run_id, "status": "pending", "replicas": []})
    start_agent(store, name)
    return Submitted(name, "started")


def ensure_agent(store: Store, name: str) -> bool:
    """Start the service's agent when it is not running; True when it had to."""
    if store.agent_alive(name):
        return False
    start_agent(store, name)
    return True


def current_release(store: Store, name: str) -> Release:
    """The running configuration, for `redeploy` without `-f` (restart every replica)."""
    spec = store.read(name, SPEC) or {}
    secrets = store.read(name, SECRETS) or {}
    return Release(
        config=spec["config"],
        config_hash=spec["config_hash"],
        replicas=int(spec["replicas"]),
        env=dict(secrets.get("env") or {}),
        probe_urls=list(spec.get("probe_urls") or []),
    )


def start_rollout(store: Store, name: str, release: Release, timeout: int) -> int:
    """Bump the deployment number and make `release` the target; returns the new number.

    The previous deployment is kept so the agent can roll back to it.
    """
    with store.lock(name):
        spec = store.read(name, SPEC)
        if spec is None or spec.get("desired") != "running":
            raise NoSuchService(name)
        rollout = spec.get("rollout") or {}
        if rollout.get("state") in ROLLOUT_ACTIVE:
            if ensure_agent(store, name):
                raise DstackctlError(
                    f"{name} is being redeployed (deployment {spec['deployment_num']}) but its agent "
                    f"was not running; restarted it, and it carries on with that rollout "
                    f"(`dstackctl ps -v {name}`)"
                )
            raise DstackctlError(
                f"{name} is already being redeployed (deployment {spec['deployment_num']}, "
                f"{rollout['state'].replace('_', ' ')}); wait for it to finish (`dstackctl ps -v {name}`)"
            )
        secrets = store.read(name, SECRETS) or {}
        number = int(spec["deployment_num"]) + 1
        previous = {
            key: spec.get(key)
            for key in ("config", "config_hash", "deployment_num", "replicas", "probe_urls")
        }
        store.write(name, SECRETS, {**secrets, "env": release.env, "previous_env": secrets.get("env") or {}})
        store.write(
            name,
            SPEC,
            {
                **spec,
                "config": release.config,
                "config_hash": release.config_hash,
                "replicas": release.replicas,
                "probe_urls": release.probe_urls,
                "deployment_num": number,
                "previous": previous,
                "rollout": {
                    "state": "in_progress",
                    "from_deployment": spec["deployment_num"],
                    "to_deployment": number,
                    "timeout": timeout,
                    "started_at": utc_now(),
                },
            },
        )
    ensure_agent(store, name)
    return number


def _expand_secret(text: str, env_values: Mapping[str, str]) -> str:
    import os

    from dstackctl.config.interpolation import interpolate
    from dstackctl.config.models import SECRET_NAMESPACES

    environ = {**os.environ, **env_values}
    try:
        return interpolate(text, {"secrets": environ, "env": environ}, SECRET_NAMESPACES)
    except KeyError as exc:
        raise UsageError(f"registry_auth uses {exc.args[0]}, which is not set in your environment") from None


# --- waiting -------------------------------------------------------------------------------


@dataclass
class Outcome:
    exit_code: ExitCode
    message: str
    view: RunView | None


def wait_ready(
    store: Store,
    name: str,
    timeout: float,
    on_change: Callable[[RunView], None] = lambda _: None,
    poll: float = 0.02,
) -> Outcome:
    """Wait until every replica is running and ready, one fails, the agent dies, or time runs out."""
    deadline = time.monotonic() + timeout
    last: RunView | None = None
    agent_grace = time.monotonic() + 5.0  # a just-started agent needs a moment to take its lock
    while True:
        current = view(store, name)
        if current is None:
            raise NoSuchService(name)
        if last is None or current.replicas != last.replicas or current.status != last.status:
            on_change(current)
        last = current
        if current.endpoint_error:
            return Outcome(ExitCode.FAILED, f"{name}: {current.endpoint_error}", current)
        spec = store.read(name, SPEC) or {}
        wanted = int(spec.get("replicas", 0))
        rows = [r for r in current.replicas if r.get("deployment_num") == spec.get("deployment_num")]
        failed = [r for r in rows if r["status"] == "failed"]
        if failed:
            return Outcome(ExitCode.FAILED, _failure_message(name, failed), current)
        ready = [r for r in rows if r["status"] == "running" and r.get("ready")]
        endpoint_up = current.url is not None or spec.get("endpoint_port") is None
        if (
            len(current.replicas) == wanted
            and len(ready) == wanted
            and current.status != "pending"
            and endpoint_up
        ):
            return Outcome(ExitCode.OK, f"{name} is ready ({wanted} of {wanted} replicas)", current)
        if not current.agent_alive and time.monotonic() > agent_grace:
            return Outcome(
                ExitCode.FAILED,
                f"the agent of {name} exited; see {store.log_path(name)}",
                current,
            )
        if time.monotonic() >= deadline:
            return Outcome(ExitCode.NOT_READY, _timeout_message(name, current, timeout), current)
        time.sleep(poll)


def wait_rollout(
    store: Store,
    name: str,
    deadline: float,
    on_change: Callable[[RunView], None] = lambda _: None,
    poll: float = 0.2,
) -> Outcome:
    """Wait for the rollout to end: done (exit 0), rolled back or failed (exit 1)."""
    stop_at = time.monotonic() + deadline
    last: RunView | None = None
    agent_grace = time.monotonic() + 5.0
    while True:
        current = view(store, name)
        if current is None:
            raise NoSuchService(name)
        if last is None or current.replicas != last.replicas:
            on_change(current)
        last = current
        spec = store.read(name, SPEC) or {}
        rollout = spec.get("rollout") or {}
        state = rollout.get("state")
        if state == "done":
            return Outcome(
                ExitCode.OK,
                f"{name} now runs deployment {spec['deployment_num']} ({spec['replicas']} replicas)",
                current,
            )
        if state == "rolled_back":
            return Outcome(
                ExitCode.FAILED,
                f"the redeploy of {name} failed and was rolled back to deployment "
                f"{spec['deployment_num']}: {rollout.get('reason')}",
                current,
            )
        if state == "rollback_failed":
            return Outcome(ExitCode.FAILED, f"{name}: {rollout.get('reason')}", current)
        if not current.agent_alive and time.monotonic() > agent_grace:
            return Outcome(
                ExitCode.FAILED, f"the agent of {name} exited; see {store.log_path(name)}", current
            )
        if time.monotonic() >= stop_at:
            return Outcome(
                ExitCode.FAILED,
                f"the redeploy of {name} is still {str(state).replace('_', ' ')} after {deadline:g}s; "
                f"the agent carries on (`dstackctl ps -v {name}`)",
                current,
            )
        time.sleep(poll)


def _failure_message(name: str, failed: list[dict[str, Any]]) -> str:
    """One line per distinct reason: `replica=0, replica=1 failed: ...`, then log tails."""
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for row in failed:
        by_reason.setdefault(row.get("message") or "unknown reason", []).append(row)
    parts = []
    for reason, rows in by_reason.items():
        who = ", ".join(f"replica={r['replica_num']}" for r in rows)
        text = f"{who} failed: {reason}"
        tail = next((r["log_tail"] for r in rows if r.get("log_tail")), None)
        if tail:
            text += "; last log lines:\n    " + "\n    ".join(tail)
        parts.append(text)
    return f"{name}: " + "\n".join(parts)


def describe_replica(replica: dict[str, Any]) -> str:
    text = f"replica={replica['replica_num']} {replica['status']}"
    if replica.get("message"):
        return f"{text}: {replica['message']}"
    probes = describe_probes(replica) if replica["status"] == "running" else ""
    return f"{text}: {probes}" if probes else text


def _timeout_message(name: str, current: RunView, timeout: float) -> str:
    waiting = [
        describe_replica(r) for r in current.replicas if not (r["status"] == "running" and r.get("ready"))
    ] or ["no replica reported yet"]
    return (
        f"{name} was not ready within {timeout:g}s: {', '.join(waiting)}; it keeps running "
        f"(`dstackctl ps -v {name}` shows why, `dstackctl stop {name}` removes it)"
    )


# --- stopping ------------------------------------------------------------------------------


def stop_service(store: Store, name: str, engine: DockerEngine) -> int:
    """Stop the agent and every container of the service; keep the record. Returns containers removed."""
    if not store.exists(name):
        raise NoSuchService(name)

    try:
        store.update(name, SPEC, lambda spec: {**spec, "desired": "stopped"})
        store.update(name, STATE, lambda state: {**state, "status": "terminating"})
    except StoreError:
        # A corrupt or foreign record must not keep the containers alive: replace it.
        with store.lock(name):
            store.write(name, SPEC, {"name": name, "desired": "stopped", "deployment_num": 0})
            store.write(name, STATE, {"name": name, "status": "terminating", "replicas": []})
    stop_agent(store, name)
    spec = store.read(name, SPEC) or {}
    grace = (spec.get("config") or {}).get("stop_duration")
    grace_seconds = stop_grace_seconds(grace)
    containers = engine.list_replicas({LABEL_RUN: name, LABEL_HOME: home_label(store.home)})
    if containers:
        with ThreadPoolExecutor(max_workers=min(8, len(containers))) as pool:
            list(pool.map(lambda r: engine.stop_and_remove(r.id, grace_seconds), containers))

    def terminated(state: dict[str, Any]) -> None:
        state["status"] = "terminated"
        for row in state.get("replicas") or []:
            if row.get("status") != "failed":
                row["status"] = "terminated"
            row["ready"] = False

    store.update(name, STATE, terminated)
    return len(containers)


# --- rebuilding a lost record ----------------------------------------------------------------


def recover_service(store: Store, name: str, engine: DockerEngine) -> tuple[str, int]:
    """Rebuild spec.json and secrets.json from the labels and env of the service's newest
    container, then restart its agent. Returns (container name, deployment number)."""
    import json

    from dstackctl.docker import LABEL_SPEC

    containers = engine.list_replicas({LABEL_RUN: name, LABEL_HOME: home_label(store.home)})
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
        store.write(
            name, STATE, {"name": name, "run_id": record.get("run_id"), "status": "pending", "replicas": []}
        )
    start_agent(store, name)
    return newest.name, int(record.get("deployment_num", 0))


# --- logs ----------------------------------------------------------------------------------


def log_sources(store: Store, name: str, engine: DockerEngine, replica: int | None) -> list[tuple[int, str]]:
    """(replica_num, container_id) of the service's containers, in replica order."""
    if not store.exists(name):
        raise NoSuchService(name)
    containers = engine.list_replicas({LABEL_RUN: name, LABEL_HOME: home_label(store.home)})
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
