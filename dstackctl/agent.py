"""The per-service agent: a detached process that makes Docker match the desired spec.

It reads `spec.json` (and `secrets.json`), compares the desired replicas with the containers
it finds by label, creates or removes containers, and writes what it sees to `state.json`.
Docker is the truth for what exists: a restarted agent adopts the containers it finds.
It never prints; it logs to `agent.log` in the service folder (names, never env values).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets as random_tokens
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dstackctl.config.models import ProbeConfig, ServiceConfiguration
from dstackctl.docker import LABEL_HOME, LABEL_RUN, DockerEngine, DockerError, Replica
from dstackctl.probes import ProbeRunner, resolve_probes
from dstackctl.replica_spec import build_replica_spec, home_label
from dstackctl.store import SECRETS, SPEC, STATE, Store, StoreError
from dstackctl.timeutil import utc_now

POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 2.0
# Probe results reach the store at most this often, but a change after a quiet spell at once.
MIN_PUBLISH_GAP_SECONDS = 0.1
LOG_TAIL_LINES = 5
AGENT_MODULE = "dstackctl.agent"

log = logging.getLogger("dstackctl.agent")


@dataclass
class _Desired:
    name: str
    run_id: str
    deployment_num: int
    replicas: int
    config_hash: str
    config: ServiceConfiguration
    config_dir: Path
    env: dict[str, str]
    registry_auth: dict[str, str] | None

    @classmethod
    def from_documents(cls, spec: dict[str, Any], secrets: dict[str, Any]) -> _Desired:
        return cls(
            name=spec["name"],
            run_id=spec["run_id"],
            deployment_num=int(spec["deployment_num"]),
            replicas=int(spec["replicas"]),
            config_hash=spec["config_hash"],
            config=ServiceConfiguration.model_validate(spec["config"]),
            config_dir=Path(spec["config_dir"]),
            env=dict(secrets.get("env") or {}),
            registry_auth=secrets.get("registry_auth"),
        )


@dataclass
class _Observed:
    """What the agent knows beyond Docker: create failures and pull progress."""

    create_failures: dict[tuple[int, str], str] = field(default_factory=dict)
    progress: dict[int, str] = field(default_factory=dict)


class ServiceAgent:
    def __init__(self, store: Store, name: str, stop: threading.Event | None = None) -> None:
        self.store = store
        self.name = name
        self.stop = stop or threading.Event()
        self.engine: DockerEngine | None = None
        self.observed = _Observed()
        self._labels = {LABEL_RUN: name, LABEL_HOME: home_label(store.home)}
        self._started_at = utc_now()
        self._last_published: dict[str, Any] | None = None
        self._last_publish_time = 0.0
        self._engine_problem: str | None = None
        self._publish_lock = threading.Lock()
        self._replica_rows: list[dict[str, Any]] = []
        self._run_id: str | None = None
        self._dirty = threading.Event()
        self._probes: tuple[str, list[ProbeConfig]] | None = None
        self.runner: ProbeRunner | None = None

    # --- main loop ----------------------------------------------------------------------

    def run(self) -> int:
        with self.store.agent_lock(self.name) as held:
            if not held:
                log.info("another agent already runs %s; this one exits", self.name)
                return 0
            return self._loop()

    def _loop(self) -> int:
        log.info("agent for %s started (pid %d)", self.name, os.getpid())
        self.runner = ProbeRunner(on_change=lambda _key: self._dirty.set())
        publisher = threading.Thread(target=self._publisher, name="publisher", daemon=True)
        publisher.start()
        try:
            return self._reconcile_until_stopped()
        finally:
            self.stop.set()
            self.runner.close()
            publisher.join(1.0)

    def _reconcile_until_stopped(self) -> int:
        while not self.stop.is_set():
            try:
                spec = self.store.read(self.name, SPEC)
                if spec is None or spec.get("desired") == "stopped":
                    log.info("service %s is no longer wanted; agent exits", self.name)
                    break
                desired = _Desired.from_documents(spec, self.store.read(self.name, SECRETS) or {})
                self._reconcile(desired)
            except DockerError as exc:
                self._lost_engine(exc.message)
            except StoreError as exc:
                log.error("%s", exc.message)
                return 1
            self.stop.wait(POLL_SECONDS)
        log.info("agent for %s stopped", self.name)
        return 0

    def _connect(self) -> DockerEngine:
        if self.engine is None:
            self.engine = DockerEngine.connect()
            if self._engine_problem:
                log.info("reconnected to Docker")
            self._engine_problem = None
        return self.engine

    def _lost_engine(self, message: str) -> None:
        if message != self._engine_problem:
            log.warning("Docker problem: %s", message)
        self._engine_problem = message
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self._publish(self._replica_rows, force=False)

    # --- reconcile ----------------------------------------------------------------------

    def _reconcile(self, desired: _Desired) -> None:
        self._run_id = desired.run_id
        engine = self._connect()
        containers = engine.list_replicas(self._labels)
        keep: dict[int, Replica] = {}
        remove: list[Replica] = []
        for replica in sorted(containers, key=_preference):
            wanted = (
                replica.config_hash == desired.config_hash
                and replica.deployment_num == desired.deployment_num
                and 0 <= replica.replica_num < desired.replicas
            )
            if wanted and replica.replica_num not in keep:
                keep[replica.replica_num] = replica
            else:
                remove.append(replica)
        missing = [
            num
            for num in range(desired.replicas)
            if num not in keep and (num, desired.config_hash) not in self.observed.create_failures
        ]
        self._publish(self._rows(desired, keep), force=False)
        if remove:
            self._remove(engine, remove, desired)
        if missing:
            created = self._create(engine, desired, missing)
            keep.update(created)
        self._watch_probes(desired, keep)
        self._publish(self._rows(desired, keep), force=False)

    def _watch_probes(self, desired: _Desired, keep: dict[int, Replica]) -> None:
        """Probe running replicas from now on; stop probing the others."""
        assert self.runner is not None
        if self._probes is None or self._probes[0] != desired.config_hash:
            self._probes = (desired.config_hash, resolve_probes(desired.config, desired.env))
        probes = self._probes[1]
        running = {r.id: r for r in keep.values() if r.status == "running" and r.host_port}
        for key in self.runner.watched():
            if key not in running:
                self.runner.forget(key)
        for replica in running.values():
            assert replica.host_port is not None
            self.runner.watch(replica.id, "127.0.0.1", replica.host_port, probes)

    def _publisher(self) -> None:
        """Writes probe changes to the store promptly, at most every MIN_PUBLISH_GAP_SECONDS."""
        while not self.stop.is_set():
            if not self._dirty.wait(0.5):
                continue
            gap = MIN_PUBLISH_GAP_SECONDS - (time.monotonic() - self._last_publish_time)
            if gap > 0 and self.stop.wait(gap):
                return
            self._dirty.clear()
            try:
                self._publish(self._replica_rows, force=False)
            except OSError as exc:
                log.error("cannot write state: %s", exc)

    def _remove(self, engine: DockerEngine, replicas: list[Replica], desired: _Desired) -> None:
        grace = desired.config.stop_duration
        grace_seconds = grace if isinstance(grace, int) else 10
        with ThreadPoolExecutor(max_workers=min(8, len(replicas))) as pool:
            for replica in replicas:
                log.info("removing container %s (replica %d)", replica.name, replica.replica_num)
                pool.submit(engine.stop_and_remove, replica.id, grace_seconds)

    def _create(self, engine: DockerEngine, desired: _Desired, nums: list[int]) -> dict[int, Replica]:
        image_problem = self._ensure_image(engine, desired, nums)
        if image_problem:
            for num in nums:
                self.observed.create_failures[(num, desired.config_hash)] = image_problem
            return {}
        for num in nums:
            self.observed.progress[num] = "creating container"
        self._publish(self._replica_rows_with_progress(desired), force=True)

        def create(num: int) -> tuple[int, Replica | None]:
            spec = build_replica_spec(
                config=desired.config,
                run_name=desired.name,
                run_id=desired.run_id,
                home=self.store.home,
                replica_num=num,
                deployment_num=desired.deployment_num,
                cfg_hash=desired.config_hash,
                env_values=desired.env,
                config_dir=desired.config_dir,
                container_suffix=random_tokens.token_hex(3),
            )
            try:
                replica = engine.create_and_start(spec)
            except DockerError as exc:
                log.error("replica %d could not start: %s", num, exc.message)
                self.observed.create_failures[(num, desired.config_hash)] = exc.message
                return num, None
            log.info("replica %d started as %s on port %s", num, replica.name, replica.host_port)
            return num, replica

        created: dict[int, Replica] = {}
        with ThreadPoolExecutor(max_workers=min(8, len(nums))) as pool:
            for num, replica in pool.map(create, nums):
                self.observed.progress.pop(num, None)
                if replica is not None:
                    created[num] = replica
        return created

    def _ensure_image(self, engine: DockerEngine, desired: _Desired, nums: list[int]) -> str | None:
        from dstackctl.replica_spec import image_of

        image = image_of(desired.config)
        if engine.has_image(image):
            return None

        def progress(text: str) -> None:
            for num in nums:
                self.observed.progress[num] = text
            self._publish(self._replica_rows_with_progress(desired), force=False)

        progress(f"pulling {image}")
        log.info("pulling image %s", image)
        try:
            engine.pull(image, progress, desired.registry_auth)
        except DockerError as exc:
            log.error("%s", exc.message)
            return exc.message
        finally:
            for num in nums:
                self.observed.progress.pop(num, None)
        return None

    # --- observed state -----------------------------------------------------------------

    def _replica_rows_with_progress(self, desired: _Desired) -> list[dict[str, Any]]:
        known = {row["replica_num"]: row for row in self._replica_rows}
        rows = []
        for num in range(desired.replicas):
            row = dict(known.get(num) or self._empty_row(num, desired))
            if num in self.observed.progress:
                row.update(status="provisioning", message=self.observed.progress[num])
            rows.append(row)
        return rows

    def _empty_row(self, num: int, desired: _Desired) -> dict[str, Any]:
        return {
            "replica_num": num,
            "job_num": 0,
            "deployment_num": desired.deployment_num,
            "status": "provisioning",
            "container_id": None,
            "container_name": None,
            "host_port": None,
            "url": None,
            "exit_code": None,
            "message": "waiting for the agent",
            "log_tail": [],
            "ready": False,
            "probes": [],
            "submitted_at": None,
        }

    def _rows(self, desired: _Desired, keep: dict[int, Replica]) -> list[dict[str, Any]]:
        rows = []
        for num in range(desired.replicas):
            row = self._empty_row(num, desired)
            replica = keep.get(num)
            failure = self.observed.create_failures.get((num, desired.config_hash))
            if replica is not None:
                row.update(self._describe(replica, desired))
            elif failure:
                row.update(status="failed", message=failure)
            elif num in self.observed.progress:
                row.update(message=self.observed.progress[num])
            rows.append(row)
        return rows

    def _describe(self, replica: Replica, desired: _Desired) -> dict[str, Any]:
        row: dict[str, Any] = {
            "deployment_num": replica.deployment_num,
            "container_id": replica.id,
            "container_name": replica.name,
            "host_port": replica.host_port,
            "url": f"http://127.0.0.1:{replica.host_port}" if replica.host_port else None,
        }
        if replica.status == "running":
            row.update(status="running", message=None)
        elif replica.status in ("created", "restarting"):
            row.update(status="provisioning", message=f"container {replica.status}")
        else:
            previous = next((r for r in self._replica_rows if r.get("container_id") == replica.id), None)
            tail = previous["log_tail"] if previous and previous["status"] == "failed" else None
            if tail is None and self.engine is not None:
                tail = _redact(self.engine.tail_text(replica.id, LOG_TAIL_LINES), desired.env)
            reason = "ran out of memory (OOM killed)" if replica.oom_killed else None
            row.update(
                status="failed",
                exit_code=replica.exit_code,
                message=reason or f"exited with code {replica.exit_code}",
                log_tail=tail or [],
            )
        return row

    def _with_probes(self, row: dict[str, Any]) -> dict[str, Any]:
        """A replica's row with its probes; `ready` means in the endpoint's rotation now."""
        snapshot = None
        if self.runner is not None and row["status"] == "running" and row.get("container_id"):
            snapshot = self.runner.snapshot(row["container_id"])
        if snapshot is None:
            return {**row, "ready": False, "probes": []}
        in_rotation, probes = snapshot
        return {**row, "ready": in_rotation, "probes": probes}

    def _publish(self, rows: list[dict[str, Any]], force: bool) -> None:
        with self._publish_lock:
            self._replica_rows = rows
            document = {
                "name": self.name,
                "run_id": self._run_id,
                "status": _run_status(rows),
                "engine_problem": self._engine_problem,
                "replicas": [self._with_probes(row) for row in rows],
            }
            now = time.monotonic()
            if (
                not force
                and document == self._last_published
                and now - self._last_publish_time < HEARTBEAT_SECONDS
            ):
                return
            self._last_published = document
            self._last_publish_time = now
            agent = {"pid": os.getpid(), "started_at": self._started_at, "heartbeat_at": utc_now()}
            self.store.write(self.name, STATE, {**document, "agent": agent, "updated_at": utc_now()})


def _preference(replica: Replica) -> tuple[int, str]:
    """Running containers first, so a duplicate that is kept is a working one."""
    return (0 if replica.status == "running" else 1, replica.name)


def _run_status(rows: list[dict[str, Any]]) -> str:
    statuses = {row["status"] for row in rows}
    if not rows:
        return "running"
    if statuses == {"failed"}:
        return "failed"
    if "provisioning" in statuses:
        return "provisioning"
    return "running"


def _redact(lines: list[str], env: dict[str, str]) -> list[str]:
    secrets = sorted((v for v in env.values() if len(v) >= 4), key=len, reverse=True)
    result = []
    for line in lines:
        for value in secrets:
            line = line.replace(value, "***")
        result.append(line[:300])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=AGENT_MODULE)
    parser.add_argument("name")
    parser.add_argument("--home", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return ServiceAgent(Store(Path(args.home)), args.name, stop).run()
    except Exception:
        log.exception("agent crashed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
