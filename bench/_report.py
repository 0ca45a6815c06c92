"""Pieces the start-up benchmarks share: timing commands in fresh processes, interleaved,
the machine's load and the per-command timing table."""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Command:
    label: str
    argv: list[str]
    env: dict[str, str] | None = None
    target: bool = False  # the command the verdict is about
    reference: bool = False  # priced for comparison, not held to the target
    times_ms: list[float] = field(default_factory=list)
    exit_codes: set[int] = field(default_factory=set)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p90_ms(self) -> float:
        return statistics.quantiles(self.times_ms, n=10, method="inclusive")[8]


def compile_package(checkout: Path = REPO_ROOT) -> None:
    """Write dstackctl's bytecode in `checkout`, as a wheel install does, so that no timed
    command compiles source (an editable install under PYTHONDONTWRITEBYTECODE would, on
    every start)."""
    if not compileall.compile_dir(checkout / "dstackctl", quiet=1):
        raise SystemExit(f"compiling dstackctl's modules in {checkout} failed")


def paired_median_ms(slower: Command, faster: Command) -> float:
    """The median of the per-round differences: the rounds are interleaved, so each pair ran
    under the same machine load, steadier than a difference of medians."""
    return statistics.median(a - b for a, b in zip(slower.times_ms, faster.times_ms, strict=True))


def run_once(command: Command) -> None:
    """Time one run of `command` in a fresh process, from the repository root, output discarded."""
    start = time.perf_counter()
    completed = subprocess.run(
        command.argv,
        cwd=REPO_ROOT,
        env=command.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    command.times_ms.append((time.perf_counter() - start) * 1000)
    command.exit_codes.add(completed.returncode)


def run_all(commands: list[Command], runs: int, warmup: int) -> None:
    """`warmup` untimed rounds, then `runs` rounds; each round runs every command once."""
    for _ in range(warmup):
        for command in commands:
            run_once(command)
    for command in commands:
        command.times_ms.clear()
        command.exit_codes.clear()
    for _ in range(runs):
        for command in commands:
            run_once(command)


def exit_notes(commands: list[Command]) -> list[str]:
    """A note for every command that did not always exit 0."""
    return [
        f"{command.label!r} exited with {sorted(command.exit_codes)}"
        for command in commands
        if command.exit_codes != {0}
    ]


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
