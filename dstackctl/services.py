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
from dstackctl.replica_spec import config_hash, home_label
from dstackctl.runs import RunView, start_agent, stop_agent, view
from dstackctl.store import SECRETS, SPEC, STATE, Store
from dstackctl.timeutil import utc_now

_NAME_CHARS = re.compile(r"[^a-z0-9-]+")


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
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
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
    already_running: bool
    agent_restarted: bool


def submit(
    store: Store, loaded: LoadedConfig, name: str, env_values: dict[str, str], engine: DockerEngine
) -> Submitted:
    """Record the desired spec and make sure the service's agent runs."""
    config = loaded.config
    data = stored_config(loaded)
    cfg_hash = config_hash(loaded.config.model_dump(mode="json", exclude_unset=True), env_values)
    with store.lock(name):
        spec = store.read(name, SPEC)
        if spec and spec.get("desired") == "running":
            if spec.get("config_hash") != cfg_hash:
                raise UsageError(
                    f"a service named {name} is running with a different configuration; "
                    f"stop it first (`dstackctl stop {name}`) or pick another name with -n"
                )
            restarted = False
            if not store.agent_alive(name):
                start_agent(store, name)
                restarted = True
            return Submitted(name, already_running=True, agent_restarted=restarted)
        run_id = uuid.uuid4().hex[:12]
        registry_auth = None
        if config.registry_auth:
            registry_auth = {
                "username": _expand_secret(config.registry_auth.username, env_values),
                "password": _expand_secret(config.registry_auth.password, env_values),
            }
        store.write(name, SECRETS, {"env": env_values, "registry_auth": registry_auth})
        store.write(
            name,
            SPEC,
            {
                "name": name,
                "run_id": run_id,
                "desired": "running",
                "config": data,
                "config_file": str(Path(loaded.file).absolute()),
                "config_dir": str(Path(loaded.file).absolute().parent),
                "config_hash": cfg_hash,
                "deployment_num": 0,
                "replicas": config.replicas,
                "submitted_at": utc_now(),
                "probe_urls": [probe.url for probe in config.effective_probes()],
            },
        )
        store.write(name, STATE, {"name": name, "run_id": run_id, "status": "pending", "replicas": []})
    start_agent(store, name)
    return Submitted(name, already_running=False, agent_restarted=False)


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
    poll: float = 0.2,
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
        failed = [r for r in current.replicas if r["status"] == "failed"]
        if failed:
            return Outcome(ExitCode.FAILED, _failure_message(name, failed), current)
        wanted = int((store.read(name, SPEC) or {}).get("replicas", 0))
        ready = [r for r in current.replicas if r["status"] == "running" and r.get("ready")]
        if len(current.replicas) == wanted and len(ready) == wanted and current.status != "pending":
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


def _failure_message(name: str, failed: list[dict[str, Any]]) -> str:
    parts = []
    for row in failed:
        text = f"replica={row['replica_num']} failed: {row.get('message') or 'unknown reason'}"
        if row.get("log_tail"):
            text += "; last log lines:\n    " + "\n    ".join(row["log_tail"])
        parts.append(text)
    return f"{name}: " + "\n".join(parts)


def describe_probes(replica: dict[str, Any]) -> str:
    """`/health 1/2 ok` or `/health 0/2 (HTTP 503)` for each probe, comma-separated."""
    parts = []
    for probe in replica.get("probes") or []:
        text = f"{probe['url']} {probe['success_streak']}/{probe['ready_after']}"
        if probe.get("last_error"):
            text += f" ({probe['last_error']})"
        elif probe.get("last_checked_at"):
            text += " ok"
        else:
            text += " (not probed yet)"
        parts.append(text)
    return ", ".join(parts)


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

    store.update(name, SPEC, lambda spec: {**spec, "desired": "stopped"})
    store.update(name, STATE, lambda state: {**state, "status": "terminating"})
    stop_agent(store, name)
    spec = store.read(name, SPEC) or {}
    grace = (spec.get("config") or {}).get("stop_duration")
    grace_seconds = _duration_seconds(grace)
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


def _duration_seconds(value: Any) -> int:
    if value in (None, "off"):
        return 10
    from dstackctl.config.units import parse_duration

    try:
        return parse_duration(value)
    except ValueError:
        return 10


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
