"""Creating replicas of the target deployment: the image, GPUs, then the containers."""

from __future__ import annotations

import logging
import secrets as random_tokens
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dstackctl.agent.desired import Deployment, Desired
from dstackctl.agent.phases import ReplicaBook, ReplicaKey
from dstackctl.docker import DockerEngine, DockerError
from dstackctl.gpus import Gpu, choose, discover, shortage_message
from dstackctl.labels import DEFAULT_GROUP
from dstackctl.replica import Replica
from dstackctl.replica_spec import build_replica_spec, image_of

log = logging.getLogger("dstackctl.agent")

StopFirst = Callable[[str], None]


class Provisioner:
    """Starts replicas; remembers which could not be created (per deployment) and why."""

    def __init__(self, home: Path, book: ReplicaBook, on_pull: Callable[[], None]) -> None:
        self._home = home
        self._book = book
        self._on_pull = on_pull  # a pull takes long: the endpoint should answer meanwhile
        self.failures: dict[tuple[int, int, str], str] = {}
        self.gpus: list[Gpu] | None = None

    def failed_nums(self, target: Deployment) -> set[int]:
        return {num for (num, number, config_hash) in self.failures if target.owns(number, config_hash)}

    def failure(self, target: Deployment, num: int) -> str | None:
        return self.failures.get((num, target.number, target.config_hash))

    def create(
        self,
        engine: DockerEngine,
        desired: Desired,
        target: Deployment,
        nums: list[int],
        containers: list[Replica],
        stop_first: StopFirst,
    ) -> list[Replica]:
        """Create and start replicas `nums` of `target`; returns the containers started."""
        problem = self._ensure_image(engine, desired, target, nums)
        if problem:
            for num in nums:
                self._fail(target, num, problem)
            return []
        gpus = self._assign_gpus(engine, target, nums, containers, stop_first)
        for num, assignment in list(gpus.items()):
            if isinstance(assignment, str):
                self._fail(target, num, assignment)
                nums = [n for n in nums if n != num]
        if not nums:
            return []
        for num in nums:
            self._book.slot(_key(target, num), "creating container")

        def create_one(num: int) -> Replica | None:
            assignment = gpus.get(num)
            device_ids = [g.uuid for g in assignment] if isinstance(assignment, list) else None
            return self._create_one(engine, desired, target, num, device_ids)

        with ThreadPoolExecutor(max_workers=min(8, len(nums))) as pool:
            created = [r for r in pool.map(create_one, nums) if r is not None]
        # Failed slots are shown once every create of the batch has ended: a waiter that
        # exits on a failure must not find a sibling's container still being set up.
        for num in nums:
            failure = self.failure(target, num)
            if failure:
                self._book.slot(_key(target, num), failure, failed=True)
        return created

    def _create_one(
        self,
        engine: DockerEngine,
        desired: Desired,
        target: Deployment,
        num: int,
        device_ids: list[str] | None,
    ) -> Replica | None:
        spec = build_replica_spec(
            config=target.config,
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
        )
        if device_ids:
            log.info("replica %d gets GPUs %s (device request device_ids=%s)", num, device_ids, device_ids)
        try:
            replica = engine.create_and_start(spec)
        except DockerError as exc:
            log.error("replica %d could not start: %s", num, exc.message)
            self.failures[(num, target.number, target.config_hash)] = exc.message
            return None
        log.info(
            "replica %d (deployment %d) started as %s on port %s",
            num,
            target.number,
            replica.name,
            replica.host_port,
        )
        return replica

    def _fail(self, target: Deployment, num: int, reason: str) -> None:
        self.failures[(num, target.number, target.config_hash)] = reason
        self._book.slot(_key(target, num), reason, failed=True)

    def _ensure_image(
        self, engine: DockerEngine, desired: Desired, target: Deployment, nums: list[int]
    ) -> str | None:
        image = image_of(target.config)
        if engine.has_image(image):
            return None

        def progress(text: str) -> None:
            for num in nums:
                self._book.slot(_key(target, num), text)

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
        nums: list[int],
        containers: list[Replica],
        stop_first: StopFirst,
    ) -> dict[int, list[Gpu] | str | None]:
        """GPUs for each new replica, or the sentence saying why there are none.

        A surge replica of a rollout that finds no free GPU replaces its old replica
        stop-first: the old one is drained and stopped, then its GPUs are reused.
        """
        spec = target.config.resources.gpu
        if spec is None or not spec.wants_gpus:
            return dict.fromkeys(nums)
        self.gpus = discover()
        taken = engine.gpus_in_use()
        result: dict[int, list[Gpu] | str | None] = {}
        for num in nums:
            chosen = choose(spec, self.gpus, taken)
            if chosen is None:
                holder = next(
                    (
                        c
                        for c in containers
                        if c.replica_num == num
                        and c.gpu_uuids
                        and not target.owns(c.deployment_num, c.config_hash)
                    ),
                    None,
                )
                if holder is not None:
                    log.info("no free GPU for the new replica %d: replacing it stop-first", num)
                    self._book.slot(
                        _key(target, num), "no free GPU for a surge replica: stopping the old one first"
                    )
                    stop_first(holder.id)
                    taken = engine.gpus_in_use()
                    chosen = choose(spec, self.gpus, taken)
            if chosen is None:
                result[num] = shortage_message(spec, self.gpus, target.replicas, taken)
                log.error("replica %d: %s", num, result[num])
            else:
                taken.update(g.uuid for g in chosen)
                result[num] = chosen
        return result


def _key(target: Deployment, num: int) -> ReplicaKey:
    return ReplicaKey(DEFAULT_GROUP, num, target.number)
