"""Pieces the start-up benchmarks share: the machine's load and the per-command timing table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_average() -> str:
    try:
        one, five, _ = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, ValueError):
        return "unknown"
    return f"{one} (1 min), {five} (5 min) on {os.cpu_count()} CPUs"


def command_table(rows: list[dict[str, Any]]) -> list[str]:
    """Lines of `command  median ms  p90 ms  over python ms  exit  target`, columns aligned."""
    header = ("command", "median ms", "p90 ms", "over python ms", "exit", "target")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        over = row["over_python_ms"]
        verdict = "" if row["passed"] is None else ("PASS" if row["passed"] else "FAIL")
        lines.append(
            (
                row["command"],
                f"{row['median_ms']:.1f}",
                f"{row['p90_ms']:.1f}",
                "" if over is None else f"{over:+.1f}",
                ",".join(str(code) for code in row["exit_codes"]),
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
