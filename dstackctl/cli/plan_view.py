"""`run --dry-run`: the plan, as text, also when something `run` needs is missing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dstackctl.cli.output import echo
from dstackctl.errors import DstackctlError, ExitCode
from dstackctl.wording import replicas_of


def dry_run(path: Path, name: str | None, env: list[str], port: int | None) -> int:
    """Print the plan and touch nothing. A missing env variable (exit 2) or missing GPUs
    (exit 1) are named after the plan, with the file and line they come from."""
    from dstackctl.cli.output import warn
    from dstackctl.config.issues import ConfigError
    from dstackctl.config.loader import load_service_file
    from dstackctl.deploy import gpu_plan, parse_env_overrides, run_name
    from dstackctl.gpus import GpuError

    loaded = load_service_file(path)
    for issue in loaded.warnings:
        warn(str(issue))
    overrides = parse_env_overrides(env, os.environ)
    problems: list[str] = []
    code = ExitCode.OK
    try:
        env_values = {**loaded.resolve_env({**os.environ, **overrides}), **overrides}
    except ConfigError as exc:
        env_values = {name: "" for name in loaded.config.environment}
        problems += [str(issue) for issue in exc.issues]
        code = ExitCode.USAGE
    try:
        gpus = gpu_plan(loaded, _engine_or_none())
    except GpuError as exc:
        gpus = None
        problems.append(f"{_gpu_place(loaded)}: {exc.message}")
        code = code or ExitCode.FAILED
    echo(plan_text(loaded, run_name(loaded, name), env_values, port, gpus))
    for problem in problems:
        echo(f"error: {problem}", err=True)
    return code


def _engine_or_none() -> Any:
    from dstackctl.docker import DockerEngine

    try:
        return DockerEngine.connect()
    except DstackctlError:
        return None  # the plan can be made without Docker; GPUs in use are then unknown


def _gpu_place(loaded: Any) -> str:
    """`file:line: resources.gpu` of the (first) GPU request."""
    from dstackctl.config.issues import dotted
    from dstackctl.config.loader import as_written

    config = loaded.config
    where: tuple[Any, ...] = ("resources", "gpu")
    for index, group in enumerate(config.groups or []):
        if group.resources.gpu is not None and group.resources.gpu.wants_gpus:
            where = as_written(("groups", index, "resources", "gpu"), loaded.data)
            break
    return f"{loaded.file}:{loaded.source.line_of(where)}: {dotted(where)}"


def plan_text(
    loaded: Any,
    service: str,
    env_values: dict[str, str],
    port: int | None,
    gpus: list[tuple[str, int, list[Any]]] | None,
) -> str:
    config = loaded.config
    local_port = port or config.port.local_port or config.port.container_port
    probes = ", ".join(f"{p.method.upper()} {p.url}" for p in config.effective_probes())
    header = [
        f"Plan for {service} (nothing was started):",
        f"  replicas:  {replicas_of(*config.replica_span)}, each publishing container port "
        f"{config.port.container_port} on 127.0.0.1 (ephemeral host port)",
        f"  endpoint:  http://127.0.0.1:{local_port}",
        f"  env:       {', '.join(sorted(env_values)) or '(none)'}",
        f"  probes:    {probes or 'none'}",
        f"  auth:      {_auth_line(config.auth, service)}",
    ]
    if config.volumes:
        mounts = (f"{v.source} -> {v.path}{' (read-only)' if v.read_only else ''}" for v in config.volumes)
        header.append(f"  volumes:   {', '.join(mounts)}")
    if config.groups is None:
        return "\n".join([*header[:1], *_group_lines(config, "0", gpus, "  "), *header[1:]])
    lines = header
    router = config.router_group
    for group in config.replica_groups:
        name = str(group.name)
        role = ", takes the endpoint's traffic" if router is not None and router.name == name else ""
        lines.append(f"  group {name} ({replicas_of(group.size.min or 0, group.size.max or 0)}{role}):")
        lines += _group_lines(config.for_group(name), name, gpus, "    ")
    return "\n".join(lines)


def _auth_line(auth: bool, service: str) -> str:
    if auth:
        return f"bearer token, made at the first run; `dstackctl token {service}` prints it"
    return "off: the endpoint takes requests from any local user (`auth: true` requires a token)"


def _group_lines(
    config: Any, group: str, gpus: list[tuple[str, int, list[Any]]] | None, indent: str
) -> list[str]:
    from dstackctl.replica_spec import entrypoint_and_command, image_of

    entrypoint, command = entrypoint_and_command(config)
    gpu = config.resources.gpu
    return [
        f"{indent}image:     {image_of(config)}",
        f"{indent}command:   {' '.join(entrypoint or [])} {' '.join(command or [])}".rstrip(),
        f"{indent}gpu:       {gpu if gpu and gpu.wants_gpus else 'none'}",
        *(
            f"{indent}  replica={num}: " + ", ".join(f"GPU {g.index} ({g}, {g.uuid})" for g in chosen)
            for name, num, chosen in gpus or []
            if name == group
        ),
    ]
