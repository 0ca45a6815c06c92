"""How dstack turns a service configuration into one replica's container (pure logic: no
docker-py, and the config models only as types)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypedDict

from dstackctl.labels import (
    DEFAULT_GROUP,
    LABEL_CONFIG_HASH,
    LABEL_DEPLOYMENT,
    LABEL_GPUS,
    LABEL_GROUP,
    LABEL_GROUP_HASH,
    LABEL_JOB,
    LABEL_REPLICA,
    LABEL_SPEC,
    service_labels,
)

if TYPE_CHECKING:
    from dstackctl.config.models import ServiceConfiguration

BASE_IMAGE = "dstackai/base:0.15-base-ubuntu24.04"
BASE_IMAGE_DEVEL = "dstackai/base:0.15-devel-ubuntu24.04"
BASE_IMAGE_VARIABLE = "DSTACK_DOCKER_BASE_IMAGE"
# `docker: true` runs dstack's Docker-in-Docker image, privileged, with dockerd started first
# (dstack settings.DSTACK_DIND_IMAGE and ServiceJobConfigurator._dstack_image_commands).
DIND_IMAGE = "dstackai/dind"
DIND_IMAGE_VARIABLE = "DSTACK_DIND_IMAGE"
VENV_DIR = "/dstack/venv"
LEGACY_REPO_DIR = "/workflow"  # where dstack puts a relative working_dir
# Env values under these names are the probe header values kept out of spec.json (deploy.py
# hide_probe_values): for the probes only, never in a container.
PROBE_VALUE_PREFIX = "DSTACKCTL_PROBE_"
DEFAULT_STOP_GRACE_SECONDS = 10
_GB = 1024**3


def stop_grace_seconds(stop_duration: object) -> int:
    """SIGTERM-to-SIGKILL grace from `stop_duration` as validated (seconds, "off", None) or as
    stored in spec.json (`"30s"`); the default when unset, "off" or unreadable."""
    if isinstance(stop_duration, int) and not isinstance(stop_duration, bool):
        return stop_duration
    if isinstance(stop_duration, str) and stop_duration != "off":
        from dstackctl.config.units import parse_duration

        try:
            return parse_duration(stop_duration)
        except ValueError:
            pass
    return DEFAULT_STOP_GRACE_SECONDS


def config_hash(config_data: Mapping[str, Any], env_values: Mapping[str, str]) -> str:
    """Identifies a configuration together with the env values it runs with."""
    canonical = json.dumps({"config": config_data, "env": env_values}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything needed to create one replica container."""

    name: str
    image: str
    labels: dict[str, str]
    container_port: int
    entrypoint: list[str] | None = None
    command: list[str] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    user: str | None = None
    privileged: bool = False
    binds: list[str] = field(default_factory=list)
    shm_size_bytes: int | None = None
    mem_limit_bytes: int | None = None
    nano_cpus: int | None = None
    gpu_count: int = 0
    gpu_device_ids: list[str] | None = None
    stop_grace_seconds: int = 10
    publish_host: str = "127.0.0.1"
    network: str | None = None  # the service's own bridge network, where replicas reach each other


def network_name(run_name: str, run_id: str) -> str:
    """The service's own Docker network: one per run, so stores in other homes never share it."""
    return f"dstackctl-{run_name}-{run_id}"


def image_of(config: ServiceConfiguration, environ: Mapping[str, str] = os.environ) -> str:
    if config.docker:
        return environ.get(DIND_IMAGE_VARIABLE, DIND_IMAGE)
    if config.image:
        return config.image
    default = BASE_IMAGE_DEVEL if config.nvcc else BASE_IMAGE
    return environ.get(BASE_IMAGE_VARIABLE, default)


def missing_image_hint(config: ServiceConfiguration) -> str:
    """What to add when the image `image_of` chose for `config` cannot be had: the variable
    that names another one. (The agent reads it from the environment it was started with, by
    the first `dstackctl run` of the service: a new value takes a stop and a new run.)"""
    if config.docker:
        what, variable, example = "dstack's Docker-in-Docker image", DIND_IMAGE_VARIABLE, ""
    elif config.image:
        return ""
    else:
        what, variable = "dstack's base image (for configs without `image`)", BASE_IMAGE_VARIABLE
        example = " (scripts/build-base-image.sh builds dstackctl-python:latest)"
    return (
        f"; {what} can be replaced: set {variable} to an image this machine has{example}, "
        "then stop the service and run it again"
    )


def join_commands(commands: list[str]) -> str:
    """dstack's join: ` && ` between commands; a command ending in `&` is wrapped in braces."""
    parts = []
    for command in commands:
        stripped = command.strip()
        if stripped.endswith("&") and not stripped.endswith("&&"):
            parts.append("{ " + stripped + " }")
        else:
            parts.append(stripped)
    return " && ".join(parts)


def _shell(config: ServiceConfiguration) -> str:
    if config.shell in (None, ""):
        return "/bin/sh" if config.image and not config.docker else "/bin/bash"
    if config.shell in ("sh", "bash"):
        return f"/bin/{config.shell}"
    return config.shell


def _commands(config: ServiceConfiguration) -> list[str]:
    commands = [*config.setup, *config.commands]
    if config.docker:
        return ["start-dockerd", *commands]
    if config.python and not config.image:
        prelude = [
            # As dstack does (it runs `rm -rf $DSTACK_VENV_DIR` first): a container started
            # again (a Docker restart, `docker restart`) still has the venv, and uv refuses to
            # create one over it.
            f"rm -rf {VENV_DIR}",
            f"uv venv -q --prompt dstack -p {config.python} --seed {VENV_DIR}",
            f". {VENV_DIR}/bin/activate",
        ]
        commands = [*prelude, *commands]
    return commands


def entrypoint_and_command(config: ServiceConfiguration) -> tuple[list[str] | None, list[str] | None]:
    commands = _commands(config)
    if config.entrypoint:
        return shlex.split(config.entrypoint), commands or None
    if commands:
        return [_shell(config), "-c"], [join_commands(commands)]
    return None, None


def dstack_environment(
    run_name: str, run_id: str, replica_num: int, job_id: str, gpus: int, working_dir: str | None
) -> dict[str, str]:
    """The DSTACK_* variables that mean something on one machine (one node, rank 0)."""
    return {
        "DSTACK_RUN_NAME": run_name,
        "DSTACK_RUN_ID": run_id,
        "DSTACK_JOB_ID": job_id,
        "DSTACK_REPLICA_NUM": str(replica_num),
        "DSTACK_NODE_RANK": "0",
        "DSTACK_NODES_NUM": "1",
        "DSTACK_MASTER_NODE_IP": "127.0.0.1",
        "DSTACK_NODES_IPS": "127.0.0.1",
        "DSTACK_GPUS_PER_NODE": str(gpus),
        "DSTACK_GPUS_NUM": str(gpus),
        **({"DSTACK_WORKING_DIR": working_dir} if working_dir else {}),
    }


def _binds(config: ServiceConfiguration, config_dir: Path) -> list[str]:
    """`source:path:mode` per volume (a list, not docker-py's mapping keyed by source, which
    would keep only one of two volumes of the same host path)."""
    binds = []
    for volume in config.volumes:
        source = volume.source
        if volume.is_host_path:
            source = str((config_dir / Path(source).expanduser()).resolve())
        binds.append(f"{source}:{volume.path}:{'ro' if volume.read_only else 'rw'}")
    return binds


def working_dir_of(config: ServiceConfiguration) -> str | None:
    """An absolute `working_dir`, or a relative one under /workflow, as dstack resolves it
    (server/services/jobs/configurators/base.py `_working_dir`, LEGACY_REPO_DIR)."""
    working_dir = config.working_dir
    if working_dir is None or working_dir.startswith("/"):
        return working_dir
    return str(PurePosixPath(LEGACY_REPO_DIR) / working_dir)


def build_replica_spec(
    *,
    config: ServiceConfiguration,
    run_name: str,
    run_id: str,
    home: Path,
    group: str = DEFAULT_GROUP,
    group_hash: str = "",
    replica_num: int,
    deployment_num: int,
    cfg_hash: str,
    env_values: Mapping[str, str],
    config_dir: Path,
    container_suffix: str,
    gpu_device_ids: list[str] | None = None,
    spec_record: Mapping[str, Any] | None = None,
    network: str | None = None,
) -> ReplicaSpec:
    entrypoint, command = entrypoint_and_command(config)
    gpu_count = _gpu_count(config, gpu_device_ids)
    job_id = f"{run_id}-{replica_num}-{deployment_num}"
    if group != DEFAULT_GROUP:
        job_id = f"{run_id}-{group}-{replica_num}-{deployment_num}"
    environment = {
        **dstack_environment(run_name, run_id, replica_num, job_id, gpu_count, working_dir_of(config)),
        **{name: value for name, value in env_values.items() if not name.startswith(PROBE_VALUE_PREFIX)},
    }
    labels = _labels(run_name, home, replica_num, deployment_num, cfg_hash, spec_record)
    labels.update({LABEL_GROUP: group, LABEL_GROUP_HASH: group_hash})
    if gpu_device_ids:
        environment["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpu_device_ids)
        labels[LABEL_GPUS] = ",".join(gpu_device_ids)
    return ReplicaSpec(
        name=f"dstackctl-{run_name}-{_group_part(group)}{replica_num}-{container_suffix}",
        image=image_of(config),
        labels=labels,
        container_port=config.port.container_port,
        entrypoint=entrypoint,
        command=command,
        environment=environment,
        working_dir=working_dir_of(config),
        user=config.user,
        privileged=config.privileged or bool(config.docker),
        binds=_binds(config, config_dir),
        **_limits(config),
        gpu_count=gpu_count,
        gpu_device_ids=gpu_device_ids,
        stop_grace_seconds=stop_grace_seconds(config.stop_duration),
        network=network,
    )


def _group_part(group: str) -> str:
    return "" if group == DEFAULT_GROUP else f"{group}-"


def _labels(
    run_name: str,
    home: Path,
    replica_num: int,
    deployment_num: int,
    cfg_hash: str,
    spec_record: Mapping[str, Any] | None,
) -> dict[str, str]:
    labels = {
        **service_labels(run_name, home),
        LABEL_GROUP: DEFAULT_GROUP,
        LABEL_REPLICA: str(replica_num),
        LABEL_JOB: "0",
        LABEL_DEPLOYMENT: str(deployment_num),
        LABEL_CONFIG_HASH: cfg_hash,
    }
    if spec_record is not None:
        labels[LABEL_SPEC] = json.dumps(spec_record, sort_keys=True)
    return labels


def _gpu_count(config: ServiceConfiguration, gpu_device_ids: list[str] | None) -> int:
    gpu = config.resources.gpu
    if gpu_device_ids is not None:
        return len(gpu_device_ids)
    if gpu is not None and gpu.wants_gpus:
        return gpu.count.min or 1
    return 0


class _Limits(TypedDict):
    shm_size_bytes: int | None
    mem_limit_bytes: int | None
    nano_cpus: int | None


def _limits(config: ServiceConfiguration) -> _Limits:
    """Docker limits from resource ranges: a range's maximum caps; a fixed value only asks."""
    resources = config.resources
    memory, cpu = resources.memory, resources.cpu
    return _Limits(
        shm_size_bytes=int(resources.shm_size * _GB) if resources.shm_size else None,
        mem_limit_bytes=int(memory.max * _GB) if memory and memory.max and memory.max != memory.min else None,
        nano_cpus=int(min(cpu.max, os.cpu_count() or 1) * 1e9)
        if cpu and cpu.max and cpu.max != cpu.min
        else None,
    )
