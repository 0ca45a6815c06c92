"""Run the real ``ServiceAgent`` without Docker, for the probe benchmarks.

The agent's reconcile loop, ProbeRunner, publisher thread and ``Store.write`` are the real
ones; only the Docker engine is replaced by ``FakeEngine``, which reports a fixed list of
running replica containers whose host ports are local HTTP servers. The runner the agent
creates can be instrumented with ``instrument_runner`` (workers, execute, on_sample).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dstackctl.config.loader import parse_service
from dstackctl.deploy import stored_config
from dstackctl.labels import (
    LABEL_CONFIG_HASH,
    LABEL_DEPLOYMENT,
    LABEL_HOME,
    LABEL_REPLICA,
    LABEL_RUN,
    home_label,
)
from dstackctl.replica import Replica
from dstackctl.replica_spec import config_hash
from dstackctl.store import SECRETS, SPEC, STATE, Store


def write_spec(store: Store, name: str, replicas: int, probe_url: str, interval_seconds: int) -> str:
    """spec.json/secrets.json/state.json as `dstackctl run` writes them; returns the config hash."""
    text = f"""
type: service
name: {name}
image: dstackctl-testsrv:latest
commands:
  - httpd -f -p 8000 -h /www
port: 8000
replicas: {replicas}
probes:
  - type: http
    url: {probe_url}
    interval: {interval_seconds}s
"""
    loaded = parse_service(text, "<bench>")
    cfg_hash = config_hash(loaded.config.model_dump(mode="json", exclude_unset=True), {})
    store.write(name, SECRETS, {"env": {}, "registry_auth": None})
    store.write(
        name,
        SPEC,
        {
            "name": name,
            "run_id": "bench",
            "desired": "running",
            "config": stored_config(loaded),
            "config_file": "<bench>",
            "config_dir": str(store.home),
            "config_hash": cfg_hash,
            "deployment_num": 0,
            "replicas": replicas,
            "submitted_at": None,
            "probe_urls": [probe_url],
        },
    )
    store.write(name, STATE, {"name": name, "run_id": "bench", "status": "pending", "replicas": []})
    return cfg_hash


def running_replicas(store: Store, name: str, cfg_hash: str, ports: list[int]) -> list[Replica]:
    replicas = []
    for num, port in enumerate(ports):
        labels = {
            LABEL_RUN: name,
            LABEL_HOME: home_label(store.home),
            LABEL_REPLICA: str(num),
            LABEL_DEPLOYMENT: "0",
            LABEL_CONFIG_HASH: cfg_hash,
        }
        replicas.append(
            Replica(
                id=f"{num + 1:064x}",
                name=f"{name}-{num}-bench",
                labels=labels,
                status="running",
                exit_code=None,
                oom_killed=False,
                host_port=port,
                started_at=None,
                ip_address="127.0.0.1",
                container_port=port,
            )
        )
    return replicas


class FakeEngine:
    """Stands in for DockerEngine: the containers exist and run; nothing is created or removed."""

    def __init__(self, replicas: list[Replica], list_seconds: float = 0.002) -> None:
        self.replicas = replicas
        self.list_seconds = list_seconds  # about what the Docker API call costs

    def list_replicas(self, _labels: dict[str, str]) -> list[Replica]:
        time.sleep(self.list_seconds)
        return list(self.replicas)

    def has_image(self, _image: str) -> bool:
        return True

    def close(self) -> None:
        pass

    def tail_text(self, _container_id: str, _lines: int) -> list[str]:
        return []

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the benchmark's fake Docker engine does not support {name}()")


def instrument_runner(**overrides: Any) -> list[Any]:
    """Make the agent build its ProbeRunner with these keyword arguments; returns a list that
    receives the runner once the agent has created it."""
    import dstackctl.agent.service_agent as agent_module
    from dstackctl.probes import ProbeRunner

    created: list[Any] = []

    class InstrumentedRunner(ProbeRunner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(overrides)
            super().__init__(*args, **kwargs)
            created.append(self)

    setattr(agent_module, "ProbeRunner", InstrumentedRunner)  # noqa: B010 - the agent looks it up there
    return created


class RecordingStore(Store):
    """A Store that calls `on_state_write(document, seconds_spent)` after each state.json write."""

    def __init__(self, home: Path, on_state_write: Callable[[dict[str, Any], float], None]) -> None:
        super().__init__(home)
        self._on_state_write = on_state_write

    def write(self, name: str, kind: str, document: dict[str, Any]) -> None:
        begin = time.monotonic()
        super().write(name, kind, document)
        if kind == STATE:
            self._on_state_write(document, time.monotonic() - begin)


def start_agent(store: Store, name: str, engine: FakeEngine) -> tuple[Any, threading.Thread]:
    """The real ServiceAgent in a thread of this process, on the fake engine."""
    from dstackctl.agent import ServiceAgent

    agent = ServiceAgent(store, name, threading.Event(), engine=engine)  # type: ignore[arg-type]
    thread = threading.Thread(target=agent.run, name="agent", daemon=True)
    thread.start()
    return agent, thread
