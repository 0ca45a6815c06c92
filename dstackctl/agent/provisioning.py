"""Creating replicas of the target deployment: the image, GPUs, then the containers."""

from __future__ import annotations

import logging
import secrets as random_tokens
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dstackctl.agent.desired import Deployment, Desired
from dstackctl.agent.phases import ReplicaBook, ReplicaKey
from dstackctl.agent.rollout_plan import Slot, slot_name
from dstackctl.config.group_refs import fill, has_refs
from dstackctl.config.models import ServiceConfiguration
from dstackctl.docker import DockerEngine, DockerError
from dstackctl.gpus import Gpu, choose, discover, shortage_message
from dstackctl.labels import service_labels
from dstackctl.replica import Replica
from dstackctl.replica_spec import build_replica_spec, image_of, missing_image_hint, network_name

log = logging.getLogger("dstackctl.agent")

StopFirst = Callable[[str], None]


class Provisioner:
    """Starts replicas; remembers which could not be created (per deployment) and why."""

    def __init__(self, home: Path, book: ReplicaBook, on_pull: Callable[[], None]) -> None:
        self._home = home
        self._book = book
        self._on_pull = on_pull  # a pull takes long: the endpoint should answer meanwhile
        self.failures: dict[tuple[Slot, int, str], str] = {}
        self.gpus: list[Gpu] | None = None
        self._network: str | None = None  # the service network this agent made sure of
        self._waiting_for_addresses: dict[Slot, str] = {}

    def show_slots(self, target: Deployment) -> None:
        """A row for each replica of the target that has no container (yet), saying why."""
        present: set[Slot] = set()
        others: set[Slot] = set()
        for state in self._book.replicas():
            if state.container is not None:
                slot = (state.key.group, state.key.replica_num)
                (present if target.owns_state(state) else others).add(slot)
        keep = []
        for slot in target.slots:
            if slot in present:
                continue
            key = _key(target, slot)
            keep.append(key)
            failure = self.failure(target, slot)
            if failure:
                self._book.slot(key, failure, failed=True)
            elif slot in self._waiting_for_addresses:
                self._book.slot(key, self._waiting_for_addresses[slot])
            elif slot in others:
                self._book.slot(key, "waits for its turn in the rolling update")
            else:
                self._book.slot(key, "waiting for the agent")
        self._book.clear_slots(keep)

    def failed_slots(self, target: Deployment) -> set[Slot]:
        return {slot for (slot, number, config_hash) in self.failures if (number, config_hash) == _id(target)}

    def failure(self, target: Deployment, slot: Slot) -> str | None:
        return self.failures.get(_failure_key(target, slot))

    def create(
        self,
        engine: DockerEngine,
        desired: Desired,
        target: Deployment,
        slots: list[Slot],
        containers: list[Replica],
        stop_first: StopFirst,
    ) -> list[Replica]:
        """Create and start replicas in `slots` of `target`; returns the containers started."""
        addresses = _Addresses(target, containers)
        slots = [slot for slot in slots if self._addresses_known(target, slot, addresses)]
        for image in dict.fromkeys(image_of(target.groups[group].config) for group, _ in slots):
            wanting = [s for s in slots if image_of(target.groups[s[0]].config) == image]
            problem = self._ensure_image(engine, desired, target, image, wanting)
            if problem:
                problem += missing_image_hint(target.groups[wanting[0][0]].config)
                for slot in wanting:
                    self._fail(target, slot, problem)
                slots = [s for s in slots if s not in wanting]
        gpus = self._assign_gpus(engine, target, slots, containers, stop_first)
        for slot, assignment in list(gpus.items()):
            if isinstance(assignment, str):
                self._fail(target, slot, assignment)
                slots = [s for s in slots if s != slot]
        if not slots:
            return []
        problem = self._ensure_network(engine, desired, target)
        if problem:
            for slot in slots:
                self._fail(target, slot, problem)
            return []
        for slot in slots:
            self._book.slot(_key(target, slot), "creating container")

        def create_one(slot: Slot) -> Replica | None:
            assignment = gpus.get(slot)
            device_ids = [g.uuid for g in assignment] if isinstance(assignment, list) else None
            return self._create_one(engine, desired, target, slot, device_ids, addresses)

        with ThreadPoolExecutor(max_workers=min(8, len(slots))) as pool:
            created = [r for r in pool.map(create_one, slots) if r is not None]
        # Failed slots are shown once every create of the batch has ended: a waiter that
        # exits on a failure must not find a sibling's container still being set up.
        for slot in slots:
            failure = self.failure(target, slot)
            if failure:
                self._book.slot(_key(target, slot), failure, failed=True)
        return created

    def _create_one(
        self,
        engine: DockerEngine,
        desired: Desired,
        target: Deployment,
        slot: Slot,
        device_ids: list[str] | None,
        addresses: _Addresses,
    ) -> Replica | None:
        group, num = slot
        spec = build_replica_spec(
            config=addresses.filled(target.groups[group].config),
            group=group,
            group_hash=target.groups[group].spec_hash,
            run_name=desired.spec.name,
            run_id=desired.spec.run_id,
            home=self._home,
            replica_num=num,
            deployment_num=target.number,
            cfg_hash=target.config_hash,
            env_values=target.env,
            config_dir=desired.config_dir,
            container_suffix=random_tokens.token_hex(3),
            gpu_device_ids=device_ids,
            spec_record=desired.spec.record(),
            network=self._network,
        )
        if device_ids:
            log.info(
                "%s gets GPUs %s (device request device_ids=%s)",
                slot_name(slot),
                device_ids,
                device_ids,
            )
        try:
            replica = engine.create_and_start(spec)
        except DockerError as exc:
            log.error("%s could not start: %s", slot_name(slot), exc.message)
            self.failures[_failure_key(target, slot)] = exc.message
            return None
        log.info(
            "%s (deployment %d) started as %s on port %s",
            slot_name(slot),
            target.number,
            replica.name,
            replica.host_port,
        )
        return replica

    def _ensure_network(self, engine: DockerEngine, desired: Desired, target: Deployment) -> str | None:
        """A service with replica groups gets a bridge network of its own (the others use
        Docker's default bridge: each network takes one of Docker's ~30 address pools)."""
        if target.config.groups is None:
            self._network = None
            return None
        network = network_name(desired.spec.name, desired.spec.run_id)
        if network == self._network:
            return None
        try:
            engine.ensure_network(network, service_labels(desired.spec.name, self._home))
        except DockerError as exc:
            if network not in exc.message:
                raise  # the engine itself is away: the agent's outage handling takes it
            log.error("%s", exc.message)
            return exc.message
        self._network = network
        return None

    def _addresses_known(self, target: Deployment, slot: Slot, addresses: _Addresses) -> bool:
        """A replica whose commands use other replicas' addresses starts once they are known."""
        missing = addresses.missing(target.groups[slot[0]].config)
        self._waiting_for_addresses.pop(slot, None)
        if missing:
            message = f"waits for the address of {', '.join(missing)}"
            self._waiting_for_addresses[slot] = message
            self._book.slot(_key(target, slot), message)
        return not missing

    def _fail(self, target: Deployment, slot: Slot, reason: str) -> None:
        self.failures[_failure_key(target, slot)] = reason
        self._book.slot(_key(target, slot), reason, failed=True)

    def _ensure_image(
        self, engine: DockerEngine, desired: Desired, target: Deployment, image: str, slots: list[Slot]
    ) -> str | None:
        if engine.has_image(image):
            return None

        def progress(text: str) -> None:
            for slot in slots:
                self._book.slot(_key(target, slot), text)

        progress(f"pulling {image}")
        log.info("pulling image %s", image)
        self._on_pull()
        try:
            engine.pull(image, progress, desired.registry_auth)
        except DockerError as exc:
            log.error("%s", exc.message)
            return exc.message
        return None

    def _assign_gpus(
        self,
        engine: DockerEngine,
        target: Deployment,
        slots: list[Slot],
        containers: list[Replica],
        stop_first: StopFirst,
    ) -> dict[Slot, list[Gpu] | str | None]:
        """GPUs for each new replica (by its group's request), or the sentence saying why none.

        A surge replica of a rollout that finds no free GPU replaces its old replica
        stop-first: the old one is drained and stopped, then its GPUs are reused.
        """
        result: dict[Slot, list[Gpu] | str | None] = {}
        taken: set[str] | None = None
        for slot in slots:
            spec = target.groups[slot[0]].config.resources.gpu
            if spec is None or not spec.wants_gpus:
                result[slot] = None
                continue
            if taken is None:
                self.gpus = discover()
                taken = engine.gpus_in_use()
            assert self.gpus is not None
            chosen = choose(spec, self.gpus, taken)
            holder = next((c for c in containers if _holds_gpus_of(c, slot, target)), None)
            if chosen is None and holder is not None:
                log.info("no free GPU for the new %s: replacing it stop-first", slot_name(slot))
                message = "no free GPU for a surge replica: stopping the old one first"
                self._book.slot(_key(target, slot), message)
                stop_first(holder.id)
                taken = engine.gpus_in_use()
                chosen = choose(spec, self.gpus, taken)
            if chosen is None:
                result[slot] = shortage_message(spec, self.gpus, target.groups[slot[0]].count, taken)
                log.error("%s: %s", slot_name(slot), result[slot])
            else:
                taken.update(g.uuid for g in chosen)
                result[slot] = chosen
        return result


def _holds_gpus_of(container: Replica, slot: Slot, target: Deployment) -> bool:
    """An old replica in the same slot that holds GPUs (a surge replica may take its place)."""
    return (
        (container.group, container.replica_num) == slot
        and bool(container.gpu_uuids)
        and not target.owns_replica(container)
    )


def _id(target: Deployment) -> tuple[int, str]:
    return (target.number, target.config_hash)


def _failure_key(target: Deployment, slot: Slot) -> tuple[Slot, int, str]:
    return (slot, target.number, target.config_hash)


def _key(target: Deployment, slot: Slot) -> ReplicaKey:
    return ReplicaKey(slot[0], slot[1], target.number)


class _Addresses:
    """The replicas' addresses on the service network, for `${{ groups[i].replicas[j].IP_ADDRESS }}`
    (group i in the order the config gives; a replica of the target first, else any running)."""

    def __init__(self, target: Deployment, containers: list[Replica]) -> None:
        self._names = list(target.groups)
        self._found: dict[Slot, str] = {}
        live = [c for c in containers if c.status == "running" and c.ip_address]
        live.sort(key=target.owns_replica)
        for container in live:  # owned ones last: they win
            assert container.ip_address is not None
            self._found[(container.group, container.replica_num)] = container.ip_address

    def address(self, group: int, replica: int) -> str | None:
        if group >= len(self._names):
            return None
        return self._found.get((self._names[group], replica))

    def missing(self, config: ServiceConfiguration) -> list[str]:
        return [name for command in config.commands for name in fill(command, self.address)[1]]

    def filled(self, config: ServiceConfiguration) -> ServiceConfiguration:
        if not any(has_refs(command) for command in config.commands):
            return config
        return config.model_copy(update={"commands": [fill(c, self.address)[0] for c in config.commands]})
