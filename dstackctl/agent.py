"""The per-service agent: a detached process that makes Docker match the desired spec.

It reads `spec.json` (and `secrets.json`), finds the service's containers by label, asks the
rollout planner what to do, does it (create, drain then stop, remove), probes running
replicas, routes the endpoint to ready ones, and writes what it sees to `state.json`.
Docker is the truth for what exists: a restarted agent adopts the containers it finds and
carries on with an unfinished rollout. It never prints; it logs to `agent.log` in the service
folder (names, never env values).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets as random_tokens
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstackctl.config.models import ProbeConfig, ServiceConfiguration
from dstackctl.docker import LABEL_HOME, LABEL_RUN, DockerEngine, DockerError, Replica
from dstackctl.gpus import Gpu, choose, discover, shortage_message
from dstackctl.netutil import EndpointError, listen
from dstackctl.probes import FAILURES_TO_LEAVE, ProbeRunner, resolve_probes
from dstackctl.replica_spec import build_replica_spec, home_label, image_of, stop_grace_seconds
from dstackctl.rollout import Observed, Plan, Target, plan
from dstackctl.runs import describe_probes
from dstackctl.store import SECRETS, SPEC, SPEC_RECORD_KEYS, STATE, Store, StoreError
from dstackctl.timeutil import utc_now

POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 2.0
# Probe results reach the store at most this often, but a change after a quiet spell at once.
MIN_PUBLISH_GAP_SECONDS = 0.1
LOG_TAIL_LINES = 5
DRAIN_SECONDS = 30.0
DEFAULT_ROLLOUT_TIMEOUT = 600
AGENT_MODULE = "dstackctl.agent"
ENDPOINT_HOST = "127.0.0.1"
ROLLOUT_ACTIVE = ("in_progress", "rolling_back")
# Docker states in which a replica's processes exist. `paused` (`docker pause`) is a hang that
# Docker knows of: the replica is probed as usual, and its probes time out.
LIVE_STATES = ("running", "paused")
# With `retry` covering `error`, a live replica whose probe failed this many times in a row is
# replaced: twice the failures that take it out of the endpoint.
HUNG_FAILURES = 2 * FAILURES_TO_LEAVE
# A replica seen running this shortly before Docker went away is started again when it is back.
OUTAGE_LOOKBACK_SECONDS = 30.0

if TYPE_CHECKING:
    from dstackctl.proxy import Endpoint

log = logging.getLogger("dstackctl.agent")


@dataclass
class _Deployment:
    """One configuration the service runs (the target, or the one a rollout replaces)."""

    number: int
    config_hash: str
    replicas: int
    config: ServiceConfiguration
    env: dict[str, str]
    probes: list[ProbeConfig]
    probe_urls: list[str]  # as written, `${{ env.X }}` unexpanded: what `ps` may show

    @classmethod
    def load(cls, document: dict[str, Any], env: dict[str, str]) -> _Deployment:
        config = ServiceConfiguration.model_validate(document["config"])
        return cls(
            number=int(document["deployment_num"]),
            config_hash=document["config_hash"],
            replicas=int(document["replicas"]),
            config=config,
            env=env,
            probes=resolve_probes(config, env),
            probe_urls=[probe.url for probe in config.effective_probes()],
        )


@dataclass
class _Desired:
    name: str
    run_id: str
    target: _Deployment
    previous: _Deployment | None
    config_dir: Path
    registry_auth: dict[str, str] | None
    endpoint_port: int | None
    rollout: dict[str, Any] | None
    record: dict[str, Any]


@dataclass
class _Memory:
    """What the agent knows beyond Docker."""

    create_failures: dict[tuple[int, int, str], str] = field(default_factory=dict)
    progress: dict[int, str] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    waiting_since: dict[str, float] = field(default_factory=dict)
    log_tails: dict[str, list[str]] = field(default_factory=dict)
    running_before_outage: set[str] = field(default_factory=set)
    seen_running: dict[str, float] = field(default_factory=dict)
    # keyed by (replica_num, deployment_num)
    first_failure: dict[tuple[int, int], float] = field(default_factory=dict)
    restarts: dict[tuple[int, int], int] = field(default_factory=dict)
    last_exit: dict[tuple[int, int], str] = field(default_factory=dict)


class ServiceAgent:
    def __init__(self, store: Store, name: str, stop: threading.Event | None = None) -> None:
        self.store = store
        self.name = name
        self.stop = stop or threading.Event()
        self.engine: DockerEngine | None = None
        self.memory = _Memory()
        self.runner: ProbeRunner | None = None
        self.endpoint: Endpoint | None = None  # started after the first containers
        self._labels = {LABEL_RUN: name, LABEL_HOME: home_label(store.home)}
        self._started_at = utc_now()
        self._started_monotonic = time.monotonic()
        self._deployments: dict[str, _Deployment] = {}
        self._containers: list[Replica] = []
        self._desired: _Desired | None = None
        self._engine_problem: str | None = None
        self._endpoint_error: str | None = None
        self._publish_lock = threading.Lock()
        self._last_published: dict[str, Any] | None = None
        self._last_publish_time = 0.0
        self._dirty = threading.Event()
        self._gpus: list[Gpu] | None = None
        self._endpoint_thread: threading.Thread | None = None
        self._listener: socket.socket | None = None  # the endpoint's, bound before it serves
        self._endpoint_url: str | None = None

    # --- main loop ----------------------------------------------------------------------

    def run(self) -> int:
        with self.store.agent_lock(self.name) as held:
            if not held:
                log.info("another agent already runs %s; this one exits", self.name)
                return 0
            return self._loop()

    def _loop(self) -> int:
        log.info("agent for %s started (pid %d)", self.name, os.getpid())
        if self.store.remove_leftover_temp_files(self.name):
            log.info("removed temporary files of interrupted writes")
        self.runner = ProbeRunner(on_change=lambda _key: self._dirty.set())
        publisher = threading.Thread(target=self._publisher, name="publisher", daemon=True)
        publisher.start()
        try:
            return self._reconcile_until_stopped()
        finally:
            self.stop.set()
            self.runner.close()
            if self._endpoint_thread is not None:
                self._endpoint_thread.join(10)
            if self.endpoint is not None:
                self.endpoint.close()
            elif self._listener is not None:
                self._listener.close()
            publisher.join(1.0)

    def _reconcile_until_stopped(self) -> int:
        while not self.stop.is_set():
            try:
                desired = self._read_desired()
                if desired is None:
                    log.info("service %s is no longer wanted; agent exits", self.name)
                    break
                self._desired = desired
                self._reconcile(desired)
            except DockerError as exc:
                self._lost_engine(exc.message)
            except StoreError as exc:
                log.error("%s", exc.message)
                return 1
            except Exception:
                # A bug must not take the endpoint down with it: log it and try again.
                log.exception("unexpected error in the reconcile loop; retrying")
            self._start_endpoint_soon()  # after the first round (and its containers), or an outage
            self.stop.wait(POLL_SECONDS)
        log.info("agent for %s stopped", self.name)
        return 0

    def _read_desired(self) -> _Desired | None:
        spec = self.store.read(self.name, SPEC)
        if spec is None or spec.get("desired") == "stopped":
            return None
        secrets = self.store.read(self.name, SECRETS) or {}
        previous = spec.get("previous")
        return _Desired(
            name=spec["name"],
            run_id=spec["run_id"],
            target=self._deployment(spec, dict(secrets.get("env") or {})),
            previous=self._deployment(previous, dict(secrets.get("previous_env") or {}))
            if previous
            else None,
            config_dir=Path(spec["config_dir"]),
            registry_auth=secrets.get("registry_auth"),
            endpoint_port=spec.get("endpoint_port"),
            rollout=spec.get("rollout"),
            record={key: spec.get(key) for key in SPEC_RECORD_KEYS},
        )

    def _deployment(self, document: dict[str, Any], env: dict[str, str]) -> _Deployment:
        key = f"{document['deployment_num']}:{document['config_hash']}:{document['replicas']}"
        if key not in self._deployments:
            self._deployments[key] = _Deployment.load(document, env)
        return self._deployments[key]

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
        if self._engine_problem is None:
            # Seen running shortly before: Docker may have stopped them on its way down before
            # this agent noticed that it was going.
            recent = time.monotonic() - OUTAGE_LOOKBACK_SECONDS
            self.memory.running_before_outage = {
                key for key, seen in self.memory.seen_running.items() if seen >= recent
            }
        self._engine_problem = message
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self._publish(force=False)

    def _bind_endpoint(self, desired: _Desired) -> None:
        """Take the endpoint's port at once: from here connections wait in its backlog, and
        `ps` and `run -d` can give the URL, even before the proxy serves them."""
        if self._listener is not None or self._endpoint_error or desired.endpoint_port is None:
            return
        try:
            self._listener = listen(ENDPOINT_HOST, desired.endpoint_port)
        except EndpointError as exc:
            self._endpoint_error = exc.message
            log.error("%s", exc.message)
            return
        self._endpoint_url = f"http://{ENDPOINT_HOST}:{desired.endpoint_port}"
        log.info("endpoint bound to %s", self._endpoint_url)

    def _start_endpoint_soon(self) -> None:
        """Start serving the bound endpoint from a thread, once the first containers were
        created: importing aiohttp takes ~0.2 s of CPU, which Docker needs while it creates
        containers on a small machine."""
        if self._endpoint_thread is not None or self._listener is None:
            return
        self._endpoint_thread = threading.Thread(
            target=self._start_endpoint, args=(self._listener,), name="endpoint-start", daemon=True
        )
        self._endpoint_thread.start()

    def _start_endpoint(self, listener: socket.socket) -> None:
        from dstackctl.proxy import Endpoint

        host, port = listener.getsockname()
        endpoint = Endpoint(self.name, port, host, listener, grace_from=self._started_monotonic)
        try:
            endpoint.start()
        except EndpointError as exc:
            self._endpoint_error = exc.message
            log.error("%s", exc.message)
            return
        self.endpoint = endpoint
        log.info("endpoint serving on %s", endpoint.url)
        self._dirty.set()

    # --- reconcile ----------------------------------------------------------------------

    def _reconcile(self, desired: _Desired) -> None:
        self._bind_endpoint(desired)
        engine = self._connect()
        self._containers = engine.list_replicas(self._labels)
        now = time.monotonic()
        self.memory.seen_running = {
            **{k: t for k, t in self.memory.seen_running.items() if now - t < OUTAGE_LOOKBACK_SECONDS},
            **{c.id: now for c in self._containers if c.status == "running"},
        }
        if self._recover(engine, desired):
            self._containers = engine.list_replicas(self._labels)
        self._watch_probes(desired)
        target = desired.target
        steps = plan(
            Target(target.number, target.config_hash, target.replicas),
            [self._observe(c) for c in self._containers],
            {
                num
                for (num, number, config_hash) in self.memory.create_failures
                if (number, config_hash) == (target.number, target.config_hash)
            },
        )
        self._publish(force=False)
        if steps.remove:
            self._stop_containers(engine, steps.remove, drain=False)
        if steps.drain:
            self._stop_containers(engine, steps.drain, drain=True)
        if steps.create:
            self._create(engine, desired, steps.create)
        self._follow_rollout(desired, steps)
        self._publish(force=False)

    def _recover(self, engine: DockerEngine, desired: _Desired) -> bool:
        """Repair what a crash or an outage left; True when containers changed.

        - a container `created` but never started (its agent died in between) is removed;
        - a replica stopped while Docker was away (a Docker restart) is started again;
        - a replica that exited, or that hangs (a probe failed HUNG_FAILURES times in a row,
          twice what takes it out of rotation), is replaced when the service's `retry` covers
          `error`, within `retry.duration` of its first failure, and no rollout is under way.
        """
        changed = False
        target = desired.target
        rolling = (desired.rollout or {}).get("state") in ROLLOUT_ACTIVE
        retry = target.config.retry
        for replica in self._containers:
            if replica.status == "created":
                log.info("removing %s: created but never started (an interrupted agent)", replica.name)
                engine.stop_and_remove(replica.id, 0)
                changed = True
            elif replica.status in ("exited", "dead") and replica.id in self.memory.running_before_outage:
                log.info("starting %s again: it stopped while Docker was away", replica.name)
                engine.start(replica.id)
                changed = True
            elif (
                (replica.status in ("exited", "dead") or self._hung(replica))
                and retry is not None
                and "error" in retry.on_events
                and not rolling
                and (replica.deployment_num, replica.config_hash) == (target.number, target.config_hash)
            ):
                num = (replica.replica_num, replica.deployment_num)
                first = self.memory.first_failure.setdefault(num, time.monotonic())
                if retry.duration is not None and time.monotonic() - first > retry.duration:
                    continue  # the retry window is over: the replica stays failed
                if replica.status in LIVE_STATES:
                    reason = "stopped answering its probes"
                elif replica.oom_killed:
                    reason = "ran out of memory"
                else:
                    reason = f"exited with code {replica.exit_code}"
                self.memory.restarts[num] = self.memory.restarts.get(num, 0) + 1
                self.memory.last_exit[num] = reason
                log.info("replica %d %s; replacing it (retry %d)", num[0], reason, self.memory.restarts[num])
                engine.stop_and_remove(replica.id, 0)
                changed = True
        if self._engine_problem is None:
            self.memory.running_before_outage.clear()
        return changed

    def _hung(self, replica: Replica) -> bool:
        if replica.status not in LIVE_STATES or self.runner is None:
            return False
        snapshot = self.runner.snapshot(replica.id)
        return bool(
            snapshot
            and not snapshot[0]
            and any(p.get("failure_streak", 0) >= HUNG_FAILURES for p in snapshot[1])
        )

    def _observe(self, replica: Replica) -> Observed:
        ready = False
        live = replica.status in LIVE_STATES
        if live and self.runner is not None:
            snapshot = self.runner.snapshot(replica.id)
            ready = bool(snapshot and snapshot[0])
            target = self._desired.target if self._desired else None
            old = target is None or (replica.deployment_num, replica.config_hash) != (
                target.number,
                target.config_hash,
            )
            if old and snapshot is not None and not ready:
                # Not probed yet (a restarted agent's first look): an old replica that may be
                # serving is drained in its turn, never removed before a new one is ready.
                ready = any(probe["last_checked_at"] is None for probe in snapshot[1])
        return Observed(
            key=replica.id,
            replica_num=replica.replica_num,
            deployment_num=replica.deployment_num,
            config_hash=replica.config_hash,
            running=live,
            ready=ready and replica.id not in self.memory.draining,
            failed=replica.status in ("exited", "dead"),
        )

    def _deployment_of(self, replica: Replica) -> _Deployment | None:
        assert self._desired is not None
        for deployment in (self._desired.target, self._desired.previous):
            if deployment and (deployment.number, deployment.config_hash) == (
                replica.deployment_num,
                replica.config_hash,
            ):
                return deployment
        return None

    def _watch_probes(self, desired: _Desired) -> None:
        """Probe running replicas (each with the probes of its own deployment); forget the rest."""
        assert self.runner is not None
        running = {r.id: r for r in self._containers if r.status in LIVE_STATES and r.host_port}
        for key in self.runner.watched():
            if key not in running:
                self.runner.forget(key)
        for replica in running.values():
            assert replica.host_port is not None
            deployment = self._deployment_of(replica) or desired.target
            self.runner.watch(
                replica.id, "127.0.0.1", replica.host_port, deployment.probes, deployment.probe_urls
            )

    def _stop_containers(self, engine: DockerEngine, keys: list[str], drain: bool) -> None:
        by_id = {c.id: c for c in self._containers}

        def stop_one(key: str) -> None:
            replica = by_id.get(key)
            name = replica.name if replica else key[:12]
            deployment = self._deployment_of(replica) if replica else None
            grace = deployment.config.stop_duration if deployment else None
            if drain and self.endpoint is not None:
                self.memory.draining.add(key)
                self._publish(force=True)
                if not self.endpoint.drain(key, DRAIN_SECONDS):
                    log.warning("%s still had requests after %ss; stopping it anyway", name, DRAIN_SECONDS)
            log.info("stopping container %s", name)
            engine.stop_and_remove(key, stop_grace_seconds(grace))
            self.memory.draining.discard(key)
            if self.runner is not None:
                self.runner.forget(key)

        with ThreadPoolExecutor(max_workers=min(8, len(keys))) as pool:
            list(pool.map(stop_one, keys))
        self._containers = [c for c in self._containers if c.id not in keys]

    def _create(self, engine: DockerEngine, desired: _Desired, nums: list[int]) -> None:
        target = desired.target
        image_problem = self._ensure_image(engine, desired, nums)
        if image_problem:
            for num in nums:
                self.memory.create_failures[(num, target.number, target.config_hash)] = image_problem
            return
        gpus = self._assign_gpus(engine, desired, nums)
        for num, assignment in list(gpus.items()):
            if isinstance(assignment, str):
                self.memory.create_failures[(num, target.number, target.config_hash)] = assignment
                nums = [n for n in nums if n != num]
        if not nums:
            return
        for num in nums:
            self.memory.progress[num] = "creating container"
        self._publish(force=True)

        def create(num: int) -> Replica | None:
            assignment = gpus.get(num)
            device_ids = [g.uuid for g in assignment] if isinstance(assignment, list) else None
            spec = build_replica_spec(
                config=target.config,
                run_name=desired.name,
                run_id=desired.run_id,
                home=self.store.home,
                replica_num=num,
                deployment_num=target.number,
                cfg_hash=target.config_hash,
                env_values=target.env,
                config_dir=desired.config_dir,
                container_suffix=random_tokens.token_hex(3),
                gpu_device_ids=device_ids,
                spec_record=desired.record,
            )
            if device_ids:
                log.info(
                    "replica %d gets GPUs %s (device request device_ids=%s)", num, device_ids, device_ids
                )
            try:
                replica = engine.create_and_start(spec)
            except DockerError as exc:
                log.error("replica %d could not start: %s", num, exc.message)
                self.memory.create_failures[(num, target.number, target.config_hash)] = exc.message
                return None
            finally:
                self.memory.progress.pop(num, None)
            log.info(
                "replica %d (deployment %d) started as %s on port %s",
                num,
                target.number,
                replica.name,
                replica.host_port,
            )
            return replica

        with ThreadPoolExecutor(max_workers=min(8, len(nums))) as pool:
            created = [r for r in pool.map(create, nums) if r is not None]
        self._containers = [*self._containers, *created]
        self.memory.seen_running.update(dict.fromkeys((r.id for r in created), time.monotonic()))
        self._watch_probes(desired)

    def _assign_gpus(
        self, engine: DockerEngine, desired: _Desired, nums: list[int]
    ) -> dict[int, list[Gpu] | str | None]:
        """GPUs for each new replica, or the sentence saying why there are none.

        A surge replica of a rollout that finds no free GPU replaces its old replica
        stop-first: the old one is drained and stopped, then its GPUs are reused.
        """
        spec = desired.target.config.resources.gpu
        if spec is None or not spec.wants_gpus:
            return dict.fromkeys(nums)
        self._gpus = discover()
        taken = engine.gpus_in_use()
        result: dict[int, list[Gpu] | str | None] = {}
        for num in nums:
            chosen = choose(spec, self._gpus, taken)
            if chosen is None:
                holder = next(
                    (
                        c
                        for c in self._containers
                        if c.replica_num == num
                        and c.gpu_uuids
                        and (c.deployment_num, c.config_hash)
                        != (desired.target.number, desired.target.config_hash)
                    ),
                    None,
                )
                if holder is not None:
                    log.info("no free GPU for the new replica %d: replacing it stop-first", num)
                    self.memory.progress[num] = "no free GPU for a surge replica: stopping the old one first"
                    self._stop_containers(engine, [holder.id], drain=True)
                    taken = engine.gpus_in_use()
                    chosen = choose(spec, self._gpus, taken)
            if chosen is None:
                result[num] = shortage_message(spec, self._gpus, desired.target.replicas, taken)
                log.error("replica %d: %s", num, result[num])
            else:
                taken.update(g.uuid for g in chosen)
                result[num] = chosen
        return result

    def _ensure_image(self, engine: DockerEngine, desired: _Desired, nums: list[int]) -> str | None:
        image = image_of(desired.target.config)
        if engine.has_image(image):
            return None

        def progress(text: str) -> None:
            for num in nums:
                self.memory.progress[num] = text
            self._publish(force=False)

        progress(f"pulling {image}")
        log.info("pulling image %s", image)
        self._start_endpoint_soon()  # a pull takes long: meanwhile, answer 503 rather than nothing
        try:
            engine.pull(image, progress, desired.registry_auth)
        except DockerError as exc:
            log.error("%s", exc.message)
            return exc.message
        finally:
            for num in nums:
                self.memory.progress.pop(num, None)
        return None

    # --- rollouts -----------------------------------------------------------------------

    def _follow_rollout(self, desired: _Desired, steps: Plan) -> None:
        rollout = desired.rollout or {}
        state = rollout.get("state")
        if state not in ROLLOUT_ACTIVE:
            return
        if steps.complete:
            self._finish_rollout("done" if state == "in_progress" else "rolled_back")
            return
        failure = self._rollout_failure(
            desired, steps, int(rollout.get("timeout") or DEFAULT_ROLLOUT_TIMEOUT)
        )
        if failure is None:
            return
        if state == "in_progress":
            self._roll_back(failure)
        else:
            cause = rollout.get("reason")
            cause = f"{cause}; " if cause else ""
            self._finish_rollout("rollback_failed", f"{cause}the rollback failed too: {failure}")

    def _rollout_failure(self, desired: _Desired, steps: Plan, timeout: int) -> str | None:
        target = desired.target
        for num in steps.failed:
            reason = self.memory.create_failures.get((num, target.number, target.config_hash))
            if reason is None:
                row = next((r for r in self._rows() if r["replica_num"] == num), None)
                reason = (row or {}).get("message") or "exited"
            return f"replica={num} (deployment {target.number}) failed: {reason}"
        now = time.monotonic()
        for key in steps.waiting_for:
            since = self.memory.waiting_since.setdefault(key, now)
            if now - since > timeout:
                row = next((r for r in self._rows() if r.get("container_id") == key), None)
                detail = (
                    f": {describe_probes(row, 'probe ') or row.get('message') or row['status']}"
                    if row
                    else ""
                )
                which = f"replica={row['replica_num']}" if row else "a new replica"
                return f"{which} (deployment {target.number}) was not ready within {timeout}s{detail}"
        return None

    def _roll_back(self, reason: str) -> None:
        log.warning("rollout failed (%s); rolling back", reason)

        def change(spec: dict[str, Any]) -> None:
            previous = spec.get("previous")
            rollout = dict(spec.get("rollout") or {})
            rollout.update(state="rolling_back", reason=reason, failed_deployment=spec["deployment_num"])
            spec["rollout"] = rollout
            if previous:
                for key in ("config", "config_hash", "deployment_num", "replicas", "probe_urls"):
                    if key in previous:
                        spec[key] = previous[key]
                spec["previous"] = None

        def restore_env(secrets: dict[str, Any]) -> None:
            if "previous_env" in secrets:
                secrets["env"] = secrets.pop("previous_env")

        self.store.update(self.name, SECRETS, restore_env)
        self.store.update(self.name, SPEC, change)
        self.memory.waiting_since.clear()

    def _finish_rollout(self, state: str, reason: str | None = None) -> None:
        log.info("rollout %s%s", state, f": {reason}" if reason else "")

        def change(spec: dict[str, Any]) -> None:
            rollout = dict(spec.get("rollout") or {})
            rollout["state"] = state
            rollout["finished_at"] = utc_now()
            if reason:
                rollout["reason"] = reason
            spec["rollout"] = rollout
            if state == "done":
                spec["previous"] = None

        def drop_previous_env(secrets: dict[str, Any]) -> None:
            secrets.pop("previous_env", None)  # in place: a returned value would replace the file

        self.store.update(self.name, SPEC, change)
        if state == "done":
            self.store.update(self.name, SECRETS, drop_previous_env)
        self.memory.waiting_since.clear()

    # --- observed state -----------------------------------------------------------------

    def _publisher(self) -> None:
        """Writes probe changes to the store promptly, at most every MIN_PUBLISH_GAP_SECONDS."""
        last_write = 0.0
        while not self.stop.is_set():
            if not self._dirty.wait(0.5):
                continue
            # The gap counts from this thread's own last write: the reconcile loop's writes
            # must not delay a probe result that just changed readiness.
            gap = MIN_PUBLISH_GAP_SECONDS - (time.monotonic() - last_write)
            if gap > 0 and self.stop.wait(gap):
                return
            self._dirty.clear()
            last_write = time.monotonic()
            try:
                self._publish(force=False)
            except OSError as exc:
                log.error("cannot write state: %s", exc)

    def _rows(self) -> list[dict[str, Any]]:
        """A row per container (every deployment), plus the target's replicas not created yet."""
        desired = self._desired
        if desired is None:
            return []
        target = desired.target
        rows = [self._describe(c) for c in self._containers]
        present = {
            r["replica_num"]
            for r in rows
            if (r["deployment_num"], r["config_hash"]) == (target.number, target.config_hash)
        }
        for num in range(target.replicas):
            if num in present:
                continue
            row = _empty_row(num, target.number, target.config_hash)
            failure = self.memory.create_failures.get((num, target.number, target.config_hash))
            if failure:
                row.update(status="failed", message=failure)
            elif num in self.memory.progress:
                row.update(message=self.memory.progress[num])
            elif any(r["replica_num"] == num for r in rows):
                row.update(message="waits for its turn in the rolling update")
            rows.append(row)
        return sorted(rows, key=lambda r: (r["replica_num"], r["deployment_num"]))

    def _describe(self, replica: Replica) -> dict[str, Any]:
        row = _empty_row(replica.replica_num, replica.deployment_num, replica.config_hash)
        row.update(
            container_id=replica.id,
            container_name=replica.name,
            host_port=replica.host_port,
            url=f"http://127.0.0.1:{replica.host_port}" if replica.host_port else None,
            submitted_at=replica.started_at,
            message=None,
            gpus=self._gpu_rows(replica.gpu_uuids),
        )
        if replica.id in self.memory.draining:
            row.update(status="terminating", message="draining requests before it stops")
        elif replica.status in LIVE_STATES:
            row.update(status="running")
            snapshot = self.runner.snapshot(replica.id) if self.runner else None
            if snapshot is not None:
                row.update(ready=snapshot[0], probes=snapshot[1])
                if snapshot[0]:
                    self.memory.first_failure.pop((replica.replica_num, replica.deployment_num), None)
            restarts = self.memory.restarts.get((replica.replica_num, replica.deployment_num))
            if restarts:
                last = self.memory.last_exit[(replica.replica_num, replica.deployment_num)]
                row.update(
                    restarts=restarts,
                    message=f"replaced {restarts} time{'s' if restarts != 1 else ''} (last: {last})",
                )
            if replica.status == "paused":
                row.update(message="paused (docker pause): it cannot answer until unpaused")
        elif replica.status in ("created", "restarting"):
            row.update(message=f"container {replica.status}")
        else:
            tail = self.memory.log_tails.get(replica.id)
            if tail is None and self.engine is not None:
                deployment = self._deployment_of(replica)
                env = deployment.env if deployment else {}
                tail = _redact(self.engine.tail_text(replica.id, LOG_TAIL_LINES), env)
                self.memory.log_tails[replica.id] = tail
            reason = "ran out of memory (OOM killed)" if replica.oom_killed else None
            row.update(
                status="failed",
                exit_code=replica.exit_code,
                message=reason or f"exited with code {replica.exit_code}",
                log_tail=tail or [],
            )
        return row

    def _gpu_rows(self, uuids: list[str]) -> list[dict[str, Any]]:
        if not uuids:
            return []
        if self._gpus is None:
            self._gpus = discover()
        known = {g.uuid: g for g in self._gpus}
        return [known[u].to_json() if u in known else {"uuid": u} for u in uuids]

    def _publish(self, force: bool) -> None:
        with self._publish_lock:
            rows = self._rows()
            if self.endpoint is not None:
                self.endpoint.set_upstreams(
                    {
                        r["container_id"]: r["host_port"]
                        for r in rows
                        if r["ready"] and r["container_id"] not in self.memory.draining
                    }
                )
            document = {
                "name": self.name,
                "run_id": self._desired.run_id if self._desired else None,
                "status": _run_status(rows),
                "engine_problem": self._engine_problem,
                "endpoint_error": self._endpoint_error,
                "url": self._endpoint_url,
                "replicas": rows,
            }
            now = time.monotonic()
            # A probe's last_checked_at changes on every check; it alone does not warrant a
            # write (a 1000-replica state is ~650 KiB): the heartbeat write carries it.
            comparable = _without_check_times(document)
            if (
                not force
                and comparable == self._last_published
                and now - self._last_publish_time < HEARTBEAT_SECONDS
            ):
                return
            self._last_published = comparable
            self._last_publish_time = now
            agent = {"pid": os.getpid(), "started_at": self._started_at, "heartbeat_at": utc_now()}
            self.store.write(self.name, STATE, {**document, "agent": agent, "updated_at": utc_now()})


def _without_check_times(document: dict[str, Any]) -> dict[str, Any]:
    return {
        **document,
        "replicas": [
            {**row, "probes": [{**p, "last_checked_at": None} for p in row["probes"]]}
            for row in document["replicas"]
        ],
    }


def _empty_row(num: int, deployment_num: int, config_hash: str) -> dict[str, Any]:
    return {
        "replica_num": num,
        "job_num": 0,
        "deployment_num": deployment_num,
        "config_hash": config_hash,
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
        "gpus": [],
    }


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


def _raise_open_file_limit() -> None:
    """Each proxied request holds two descriptors: 1,000 open streams need more than the
    common soft limit of 1,024, and running out looked like "no replica could be reached"."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)


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
    _raise_open_file_limit()
    try:
        return ServiceAgent(Store(Path(args.home)), args.name, stop).run()
    except Exception:
        log.exception("agent crashed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
