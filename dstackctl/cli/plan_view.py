"""`run --dry-run`: the plan, as text."""

from __future__ import annotations

from typing import Any

from dstackctl.wording import count_of


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
        f"  replicas:  {config.total_replicas}, each publishing container port "
        f"{config.port.container_port} on 127.0.0.1 (ephemeral host port)",
        f"  endpoint:  http://127.0.0.1:{local_port}",
        f"  env:       {', '.join(sorted(env_values)) or '(none)'}",
        f"  probes:    {probes or 'none'}",
    ]
    if config.groups is None:
        return "\n".join([*header[:1], *_group_lines(config, "0", gpus, "  "), *header[1:]])
    lines = header
    router = config.router_group
    for name, count in config.group_counts.items():
        role = ", takes the endpoint's traffic" if router is not None and router.name == name else ""
        lines.append(f"  group {name} ({count_of(count, 'replica')}{role}):")
        lines += _group_lines(config.for_group(name), name, gpus, "    ")
    return "\n".join(lines)


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
