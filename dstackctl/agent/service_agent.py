"""The per-service agent's reconcile loop: makes Docker match the desired spec.

Each round it reads spec.json and secrets.json, observes the service's containers (by label)
into the replica book, repairs what a crash or an outage left, asks the rollout planner what
to do, does it (create, drain then stop, remove), and follows the rollout. Probe results
reach the book from the probe runner; the endpoint and the status publisher consume the
book's changes. Docker is the truth for what exists: a restarted agent adopts the containers
it finds and carries on with an unfinished rollout. It never prints; it logs to `agent.log`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from dstackctl.agent.autoscaler import Autoscaler
from dstackctl.agent.desired import Deployment, Desired, DesiredReader
from dstackctl.agent.endpoint_host import EndpointHost
from dstackctl.agent.left_state import LeftState
from dstackctl.agent.log_keeper import LogKeeper
from dstackctl.agent.phases import (
    EXITED_STATES,
    LIVE_STATES,
    Phase,
    ReplicaBook,
    ReplicaKey,
    container_of,
    key_of,
)
from dstackctl.agent.provisioning import Provisioner
from dstackctl.agent.publishing import Facts, StatusPublisher
from dstackctl.agent.recovery import Action, OutageMemory, Repair, RetryPolicy, hung, plan_repairs
from dstackctl.agent.rollout_plan import Observed, Slot, Target, plan, slot_name
from dstackctl.agent.rollouts import RolloutMonitor
from dstackctl.agent.router_workers import RouterWorkers
from dstackctl.agent.row_lookups import RowLookups
from dstackctl.agent.supervisor import SupervisorLink
from dstackctl.docker import DockerEngine, DockerError
from dstackctl.kept_logs import LOGS_DIR
from dstackctl.labels import service_labels
from dstackctl.probes import ProbeRunner
from dstackctl.replica import Replica
from dstackctl.replica_spec import stop_grace_seconds
from dstackctl.store import Store, StoreError

POLL_SECONDS = 0.5

log = logging.getLogger("dstackctl.agent")


class ServiceAgent:
    def __init__(
        self,
        store: Store,
        name: str,
        stop: threading.Event | None = None,
        engine: DockerEngine | None = None,
        link: SupervisorLink | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.stop = stop or threading.Event()
        self.engine = engine
        self._connect_engine: Callable[[], DockerEngine] = (
            (lambda: engine) if engine else DockerEngine.connect
        )
        self.book = ReplicaBook()
        self.facts = Facts()
        self.endpoint = EndpointHost(name, self.book, grace_from=time.monotonic(), link=link)
        self.provisioner = Provisioner(store.home, self.book, on_pull=self.endpoint.start_soon)
        sources = RowLookups(lambda: self.engine, lambda: self._desired, self.provisioner)
        self.publisher = StatusPublisher(store, name, self.book, self.facts, sources)
        self.rollouts = RolloutMonitor(None)
        self.router_workers = RouterWorkers()
        self.logs = LogKeeper(store.service_dir(name) / LOGS_DIR, self._secrets_of)
        self.runner: ProbeRunner | None = None
        self._reader = DesiredReader(store, name)
        self._labels = service_labels(name, store.home)
        self._desired: Desired | None = None
        self._containers: list[Replica] = []
        self._outage = OutageMemory()
        self._first_failure: dict[ReplicaKey, float] = {}
        self._wake = threading.Event()  # a request waits for a replica: reconcile now
        self.autoscaler: Autoscaler | None = None
        self._left = LeftState(store, name)  # what the previous agent published

    # --- process ------------------------------------------------------------------------

    def run(self, lock_held: bool = False) -> int:
        """Reconcile until stopped; `lock_held`: the caller (the supervisor) holds the agent lock."""
        if lock_held:
            return self._run_locked()
        with self.store.agent_lock(self.name) as held:
            if not held:
                log.info("another agent already runs %s; this one exits", self.name)
                return 0
            return self._run_locked()

    def _run_locked(self) -> int:
        log.info("agent for %s started (pid %d)", self.name, os.getpid())
        if self.store.remove_leftover_temp_files(self.name):
            log.info("removed temporary files of interrupted writes")
        # A restart carries on with the rollout (or stays rolled back).
        self.rollouts = RolloutMonitor(self._left.rollout)
        self.runner = ProbeRunner(on_change=self._probe_changed)
        self.endpoint.confirm_hangs_with(self.runner.check_now)
        publisher = threading.Thread(
            target=self.publisher.run, args=(self.stop,), name="publisher", daemon=True
        )
        publisher.start()
        try:
            return self._reconcile_until_stopped()
        finally:
            self.stop.set()
            self.runner.close()
            self.router_workers.close()
            self.logs.close()
            self.endpoint.close()
            publisher.join(1.0)

    def _reconcile_until_stopped(self) -> int:
        while not self.stop.is_set():
            try:
                desired = self._reader.read()
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
            self.endpoint.start_soon()  # after the first round (and its containers), or an outage
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()
        log.info("agent for %s stopped", self.name)
        return 0

    def _connect(self) -> DockerEngine:
        if self.engine is None:
            self.engine = self._connect_engine()
            if self.facts.engine_problem:
                log.info("reconnected to Docker")
            self.facts.engine_problem = None
        return self.engine

    def _lost_engine(self, message: str) -> None:
        if message != self.facts.engine_problem:
            log.warning("Docker problem: %s", message)
        if self.facts.engine_problem is None:
            self._outage.began()
        self.facts.engine_problem = message
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self.publisher.publish()

    # --- one round ----------------------------------------------------------------------

    def _reconcile(self, desired: Desired) -> None:
        self.endpoint.bind(desired.spec.endpoint_port)
        self.endpoint.protect(desired.auth, desired.auth_token)
        engine = self._connect()
        target = self._scaled(desired, self.rollouts.target(desired))
        router = target.config.router_group
        self.endpoint.route_to(router.name if router else None)
        self.book.want(ReplicaKey(group, num, target.number) for group, num in target.slots)
        self._note_facts(desired, target)
        self._observe(engine)
        if self._repair(engine, target):
            self._observe(engine)
        self._watch_probes(desired, target)
        self.provisioner.show_slots(target)
        steps = plan(
            Target(tuple(target.slots)),
            [self._planned(c, target) for c in self._containers],
            self.provisioner.failed_slots(target),
        )
        self.publisher.publish()
        if steps.remove:
            self._stop_containers(engine, steps.remove, drain=False)
        if steps.drain:
            self._stop_containers(engine, steps.drain, drain=True)
        if steps.create:
            self._create(engine, desired, target, steps.create)
        self.rollouts.follow(desired, steps, self._why_failed(target), self._why_waiting)
        self.facts.rollout = self.rollouts.status
        self.router_workers.follow(target, self._containers, self.book)
        self.publisher.publish()

    def _scaled(self, desired: Desired, target: Deployment) -> Deployment:
        """The target with the counts the autoscaler decides for its autoscaled groups."""
        if self.autoscaler is None:
            self.autoscaler = Autoscaler(self.endpoint.rate, self._left.scaling(desired.spec.run_id))
        scaled = self.autoscaler.apply(target, holding=self.rollouts.active)
        self.facts.scaling = self.autoscaler.groups
        hold = desired.spec.wake_timeout if self.autoscaler.can_idle else 0
        self.endpoint.hold_when_idle(hold, self._wake.set)
        return scaled

    def _note_facts(self, desired: Desired, target: Deployment) -> None:
        facts = self.facts
        facts.run_id = desired.spec.run_id
        facts.observed_deployment = desired.current.number
        facts.deployment_num = target.number
        facts.target_replicas = target.replicas
        facts.config_hash = target.config_hash
        facts.rollout = self.rollouts.status
        facts.url = self.endpoint.url
        facts.endpoint_error = self.endpoint.error

    def _observe(self, engine: DockerEngine) -> None:
        self._containers = engine.list_replicas(self._labels)
        self._outage.saw(c.id for c in self._containers if c.status == "running")
        for replica in self._containers:
            self.book.observe(key_of(replica), container_of(replica))
            # The runner reports changes of symbol, error or rotation only; hang detection
            # needs every failure counted, so take a fresh look each round.
            self._probe_changed(replica.id)
        self.book.forget_missing(c.id for c in self._containers)
        if self.runner is not None:
            self.endpoint.readmit_probed(self.runner.views)
        self.logs.follow(engine, self._containers)

    def _planned(self, replica: Replica, target: Deployment) -> Observed:
        state = self.book.get(replica.id)
        live = replica.status in LIVE_STATES
        ready = state is not None and state.ready
        old = not target.owns_replica(replica)
        if old and live and state is not None and not state.probed and state.phase is not Phase.DRAINING:
            # Not probed yet (a restarted agent's first look): an old replica that may be
            # serving is drained in its turn, never removed before a new one is ready.
            ready = True
        return Observed(
            key=replica.id,
            slot=(replica.group, replica.replica_num),
            owned=not old,
            running=live,
            ready=ready,
            failed=replica.status in EXITED_STATES,
        )

    # --- probes -------------------------------------------------------------------------

    def _watch_probes(self, desired: Desired, target: Deployment) -> None:
        """Probe running replicas (each with the probes of its own deployment); forget the rest."""
        assert self.runner is not None
        running = {r.id: r for r in self._containers if r.status in LIVE_STATES and r.host_port}
        for key in self.runner.watched():
            if key not in running:
                self.runner.forget(key)
        for replica in running.values():
            assert replica.host_port is not None
            deployment = self._deployment_of(replica) or target
            group = deployment.groups.get(replica.group) or target.groups.get(replica.group)
            probes, urls = (group.probes, group.probe_urls) if group else ([], [])
            address = None
            if replica.ip_address:
                address = (replica.ip_address, replica.container_port or target.config.port.container_port)
            carried = self._left.ready_probes(replica.id, desired.spec.run_id)
            self.runner.watch(replica.id, "127.0.0.1", replica.host_port, probes, urls, address, carried)

    def _probe_changed(self, container_id: str) -> None:
        snapshot = self.runner.snapshot(container_id) if self.runner else None
        if snapshot is None:
            return
        in_rotation, probes = snapshot
        checked = in_rotation or any(p.last_checked_at is not None for p in probes)
        self.book.probed(container_id, in_rotation, probes, checked)
        state = self.book.get(container_id)
        if state is not None and state.ready:
            self._first_failure.pop(state.key, None)

    # --- repairs, stops and creates -----------------------------------------------------

    def _repair(self, engine: DockerEngine, target: Deployment) -> bool:
        """Carry out plan_repairs; True when containers changed."""
        retry = target.config.retry
        policy = RetryPolicy("error" in retry.on_events, retry.duration) if retry else None
        now = time.monotonic()
        replicas = [s for s in self.book.replicas() if s.container is not None]
        for state in replicas:
            assert state.container is not None
            if target.owns_state(state) and (state.container.docker_status in EXITED_STATES or hung(state)):
                self._first_failure.setdefault(state.key, now)
        failing_for = {key: now - since for key, since in self._first_failure.items()}
        actions = plan_repairs(
            replicas,
            lambda state: target.owns_state(state),
            policy,
            self.rollouts.active,
            self._outage.stopped,
            failing_for,
        )
        for action in actions:
            self._carry_out(engine, action)
        if self.facts.engine_problem is None:
            self._outage.stopped.clear()
        return bool(actions)

    def _carry_out(self, engine: DockerEngine, action: Action) -> None:
        container = action.replica.container
        assert container is not None
        if action.repair is Repair.START:
            log.info("starting %s again: %s", container.name, action.reason)
            engine.start(container.id)
            return
        if action.repair is Repair.REPLACE:
            key = action.replica.key
            count = self.facts.restarts.get(key, (0, ""))[0] + 1
            self.facts.restarts[key] = (count, action.reason)
            name = slot_name((key.group, key.replica_num))
            log.info("%s %s; replacing it (retry %d)", name, action.reason, count)
        else:
            log.info("removing %s: %s (an interrupted agent)", container.name, action.reason)
        engine.stop_and_remove(container.id, 0)
        self._gone(container.id)

    def _gone(self, container_id: str) -> None:
        self.book.removed(container_id)
        if self.runner is not None:
            self.runner.forget(container_id)

    def _stop_containers(self, engine: DockerEngine, ids: list[str], drain: bool) -> None:
        by_id = {c.id: c for c in self._containers}

        def stop_one(container_id: str) -> None:
            replica = by_id.get(container_id)
            name = replica.name if replica else container_id[:12]
            deployment = self._deployment_of(replica) if replica else None
            if drain:
                self.book.drain(container_id)
                self.publisher.publish(force=True)
                if not self.endpoint.drain(container_id):
                    log.warning("%s still had requests after draining; stopping it anyway", name)
            log.info("stopping container %s", name)
            grace = deployment.config.stop_duration if deployment else None
            engine.stop_and_remove(container_id, stop_grace_seconds(grace))
            self._gone(container_id)

        with ThreadPoolExecutor(max_workers=min(8, len(ids))) as pool:
            list(pool.map(stop_one, ids))
        self._containers = [c for c in self._containers if c.id not in ids]

    def _create(self, engine: DockerEngine, desired: Desired, target: Deployment, slots: list[Slot]) -> None:
        def stop_first(container_id: str) -> None:
            self._stop_containers(engine, [container_id], drain=True)

        created = self.provisioner.create(engine, desired, target, slots, self._containers, stop_first)
        self._containers = [*self._containers, *created]
        for replica in created:
            self._outage.saw([replica.id])
            self.book.observe(key_of(replica), container_of(replica))
        self._watch_probes(desired, target)

    # --- what rows and rollouts need ----------------------------------------------------

    def _secrets_of(self, replica: Replica) -> dict[str, str]:
        """The env values a replica runs with: masked in the output the agent keeps."""
        deployment = self._deployment_of(replica)
        desired = self._desired
        if deployment is None and desired is not None:
            deployment = desired.current
        return deployment.env if deployment is not None else {}

    def _deployment_of(self, replica: Replica) -> Deployment | None:
        desired = self._desired
        if desired is None:
            return None
        return desired.deployment(
            replica.group, replica.deployment_num, replica.config_hash, replica.group_hash
        )

    def _why_failed(self, target: Deployment) -> Callable[[Slot], str]:
        def why(slot: Slot) -> str:
            failure = self.provisioner.failure(target, slot)
            if failure:
                return failure
            rows = [r for r in self.publisher.rows() if (r.group, r.replica_num) == slot]
            rows.sort(key=lambda r: r.deployment_num != target.number)  # its own first
            return next((r.message for r in rows if r.message), "exited")

        return why

    def _why_waiting(self, container_id: str) -> tuple[str, str]:
        row = next((r for r in self.publisher.rows() if r.container_id == container_id), None)
        if row is None:
            return "a new replica", ""
        detail = row.describe_probes("probe ") or row.message or row.status
        return slot_name((row.group, row.replica_num)), f": {detail}"
