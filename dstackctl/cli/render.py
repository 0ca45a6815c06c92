"""Rendering of runs: dstack's `ps` table and the versioned JSON envelope."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from dstackctl.runs import RunView
from dstackctl.status import ReplicaRow
from dstackctl.timeutil import ago
from dstackctl.wording import decimal

JSON_VERSION = 1
MESSAGE_WIDTH = 60


def runs_json(views: list[RunView]) -> str:
    return json.dumps({"version": JSON_VERSION, "runs": [v.to_json() for v in views]}, indent=2)


def _probe_symbols(replica: ReplicaRow) -> str:
    if replica.status != "running":
        return ""
    return "".join(p.symbol for p in replica.probes)


def gpu_summary(gpus: Iterable[dict[str, Any]]) -> str:
    """`2xA10G (24GB)`; several models are listed one after the other."""
    groups: dict[tuple[str, Any], int] = {}
    for gpu in gpus:
        name = str(gpu.get("name") or gpu.get("uuid", "GPU"))
        for prefix in ("NVIDIA ", "Tesla "):
            name = name.removeprefix(prefix)
        key = (name.split("-")[0].replace("GeForce ", ""), gpu.get("memory_gb"))
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(
        f"{count}x{name}" + (f" ({memory}GB)" if memory else "") for (name, memory), count in groups.items()
    )


def _probe_error(replica: ReplicaRow) -> str | None:
    if replica.status != "running":
        return None
    for probe in replica.probes:
        if probe.last_error:
            return f"probe {probe.url}: {probe.last_error}"
    return None


def _replica_status(replica: ReplicaRow) -> str:
    if replica.status == "failed" and replica.exit_code is not None:
        return f"failed (exit {replica.exit_code})"
    return replica.status


def _clip(text: str | None, wide: bool) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if wide or len(text) <= MESSAGE_WIDTH else text[: MESSAGE_WIDTH - 1] + "…"


def plain_table(headers: list[str], rows: list[list[str]]) -> str:
    """The table tabulate's "plain" format prints (with PRESERVE_WHITESPACE, no number parsing):
    left-aligned columns two spaces apart, each at least its header's width plus two, lines
    right-stripped. Written out because tabulate infers every cell's type first, which took
    half of `ps`'s time with 1000 services; tests/unit/test_render.py holds it to tabulate."""
    widths = [len(header) + 2 for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            if len(cell) > widths[index]:
                widths[index] = len(cell)
    lines = []
    for line in [headers, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return "\n".join(lines)


def runs_table(views: list[RunView], verbose: bool, wide: bool) -> str:
    headers = ["NAME", "BACKEND", "STATUS", "READY", "PROBES", "SUBMITTED", "URL"]
    with_rps = any(run.scaling for run in views)
    if with_rps:
        headers.insert(4, "RPS")
    with_gpus = verbose and any(r.gpus for run in views for r in run.replicas)
    if with_gpus:
        headers.append("GPU")
    if verbose:
        headers.append("MESSAGE")
    if wide:
        headers.append("CONTAINER")
    rows: list[list[str]] = []
    for run in views:
        row = [
            f"{run.name} deployment={run.deployment_num}" if verbose else run.name,
            "",
            run.status if run.agent_alive or not run.active else f"{run.status} (agent down)",
            _ready(run),
            "",
            ago(run.submitted_at),
            run.url or "",
        ]
        if with_rps:
            row.insert(4, _rate(run.rps) if run.active else "")
        if with_gpus:
            row.append("")
        if verbose:
            row.append(_clip(run.engine_problem, wide))
        if wide:
            row.append("")
        if not verbose:
            row[1] = "local"
        rows.append(row)
        if verbose:
            rows += _verbose_rows(run, headers, with_gpus, wide)
    if not rows:
        return "No services. Start one with `dstackctl run -f FILE`."
    return plain_table(headers, rows)


def _verbose_rows(run: RunView, headers: list[str], with_gpus: bool, wide: bool) -> list[list[str]]:
    """A row per replica (dstack's), and one before an autoscaled group's replicas."""
    order = _group_numbers(run)
    shown: set[str] = set()
    rows: list[list[str]] = []
    for name, replica in _named_replicas(run, order):
        rows += _group_rows(run, order, shown, replica.group, headers)
        line = [name, *_replica_line(replica, run, with_gpus, wide)]
        if "RPS" in headers:
            line.insert(4, "")
        rows.append(line)
    for group in run.scaling:  # autoscaled groups without replicas (scaled to zero)
        rows += _group_rows(run, order, shown, group, headers)
    return rows


def _ready(run: RunView) -> str:
    """`1/2`, ready of desired; `1/2 (0..4)` with the range of an autoscaled service."""
    if not run.active:
        return ""
    text = f"{run.ready_replicas}/{run.desired_replicas}"
    return f"{text} ({run.replica_range})" if run.replica_range else text


def _rate(rps: float | None) -> str:
    return "" if rps is None else decimal(rps)


def _group_rows(
    run: RunView, order: dict[str, int], shown: set[str], group: str, headers: list[str]
) -> list[list[str]]:
    """`ps -v`: an autoscaled group's own row (range, rate, rule, pending change) before its
    first replica, once."""
    scaling = run.scaling.get(group)
    if scaling is None or group in shown or not run.active:
        return []
    shown.add(group)
    ready = sum(1 for r in run.replicas if r.group == group and r.ready)
    rule = f"target {_rate(scaling.target)} rps over {scaling.window}s"
    if scaling.last_scaled_at:
        rule += f"; last scaled {ago(scaling.last_scaled_at)}"
    if scaling.pending:
        rule += f"; {scaling.pending}"
    row = [f"   group={order.get(group, len(order))}", "", "autoscaled"]
    row += [f"{ready}/{scaling.desired} ({scaling.min}..{scaling.max})", _rate(scaling.rps)]
    row += [""] * (len(headers) - len(row))
    row[headers.index("MESSAGE")] = rule
    return [row]


def _group_numbers(run: RunView) -> dict[str, int]:
    """Group name -> the number `ps -v` shows as `group=N` (its place in the config)."""
    return {name: index for index, name in enumerate(run.group_order)}


def _named_replicas(run: RunView, order: dict[str, int]) -> list[tuple[str, ReplicaRow]]:
    """dstack's NAME cells (cli/utils/run.py `_format_job_name`): `   group=0 replica=0
    deployment=2`, the next replica of the same group aligned under `replica=`. (dstack leaves
    out `group= replica=` when there is one replica; we always name it.) `order`: _group_numbers."""
    rows = sorted(
        run.replicas, key=lambda r: (order.get(r.group, len(order)), r.replica_num, r.deployment_num)
    )
    named = []
    last_index: int | None = None
    for row in rows:
        index = order.get(row.group, len(order))
        if index != last_index:
            name = f"   group={index} replica={row.replica_num}"
        else:
            name = " " * (3 + len(f"group={last_index}") + 1) + f"replica={row.replica_num}"
        last_index = index
        named.append((f"{name} deployment={row.deployment_num}", row))
    return named


def _replica_line(replica: ReplicaRow, run: RunView, with_gpus: bool, wide: bool) -> list[str]:
    line = [
        "local",
        _replica_status(replica),
        "",
        _probe_symbols(replica),
        ago(replica.submitted_at or run.submitted_at),
        replica.url or "",
    ]
    if with_gpus:
        line.append(gpu_summary(replica.gpus))
    line.append(_clip(replica.message or _probe_error(replica), wide))
    if wide:
        line.append((replica.container_id or "")[:12])
    return line
