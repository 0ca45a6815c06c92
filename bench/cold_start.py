"""Cold-start benchmark: how long a fresh ``dstackctl`` process takes over bare Python.

Each round runs every command once, in a fresh process, interleaved so machine noise hits
all commands alike; a warm-up round is not counted. dstackctl's bytecode is written first,
as a wheel install has it. Targets (the standing budgets):

- ``dstackctl --help`` within 120 ms of ``python -c pass`` (same interpreter), medians;
- ``dstackctl validate samples/*.yml`` within 50 ms of the yaml+pydantic floor: Python
  importing PyYAML and pydantic and validating one one-field model, with the console script's
  settings (pydantic's plugin discovery off, the collector paused, the heap frozen before
  exit). The difference is the median of the per-round differences.

A reference row, not part of the verdict, prices importing dstackctl's config models alone.

    .venv/bin/python bench/cold_start.py [--runs 15] [--json]

Exit status: 0 when every command meets the target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _report import (
    REPO_ROOT,
    Command,
    command_table,
    compile_package,
    exit_notes,
    paired_median_ms,
    run_all,
)

TARGET_MS = 120.0
FLOOR_TARGET_MS = 50.0
BASELINE = "python -c pass"
VALIDATE = "dstackctl validate samples/*.yml"
FLOOR = "(floor) import yaml+pydantic, 1 model"
PYDANTIC_FLOOR = """\
import yaml
from pydantic import BaseModel, ConfigDict
class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    port: int
Model.model_validate(yaml.safe_load("port: 8000"))
"""


def build_commands() -> tuple[list[Command], list[str]]:
    """The commands to time, and notes on what was left out or looks odd."""
    notes: list[str] = []
    dstackctl = Path(sys.executable).parent / "dstackctl"
    commands = [
        Command(BASELINE, [sys.executable, "-c", "pass"]),
        Command("dstackctl --help", [str(dstackctl), "--help"]),
    ]
    samples = sorted(REPO_ROOT.glob("samples/*.yml"))
    if samples:
        commands.append(
            Command(
                VALIDATE,
                [str(dstackctl), "validate", *(str(s) for s in samples)],
            )
        )
    else:
        notes.append("no samples/*.yml found: 'dstackctl validate' not timed")
    no_plugins = "import gc, os; gc.disable(); os.environ['PYDANTIC_DISABLE_PLUGINS'] = '1'\n"
    commands += [
        Command(
            FLOOR,
            [sys.executable, "-c", no_plugins + PYDANTIC_FLOOR + "gc.freeze()"],
            reference=True,
        ),
        Command(
            "(reference) import dstackctl's models",
            [sys.executable, "-c", no_plugins + "import dstackctl.config.loader\ngc.freeze()"],
            reference=True,
        ),
    ]
    if not dstackctl.exists():
        notes.append(f"{dstackctl} not found: install the package into this interpreter")
    return commands, notes


def summarise(commands: list[Command], runs: int, notes: list[str]) -> dict[str, object]:
    by_label = {command.label: command for command in commands}
    baseline = by_label[BASELINE].median_ms
    validate, floor = by_label.get(VALIDATE), by_label[FLOOR]
    over_floor = None if validate is None else paired_median_ms(validate, floor)
    rows = []
    for command in commands:
        over = None if command.label == BASELINE else command.median_ms - baseline
        if command.label == VALIDATE:
            passed: bool | None = over_floor is not None and over_floor <= FLOOR_TARGET_MS
        else:
            passed = None if over is None or command.reference else over <= TARGET_MS
        rows.append(
            {
                "command": command.label,
                "median_ms": round(command.median_ms, 1),
                "p90_ms": round(command.p90_ms, 1),
                "over_python_ms": None if over is None else round(over, 1),
                "exit_codes": sorted(command.exit_codes),
                "passed": passed,
            }
        )
    return {
        "schema": 2,
        "python": sys.executable,
        "runs": runs,
        "target_over_python_ms": TARGET_MS,
        "target_validate_over_floor_ms": FLOOR_TARGET_MS,
        "validate_over_floor_ms": None if over_floor is None else round(over_floor, 1),
        "results": rows,
        "notes": notes,
        "passed": all(row["passed"] is not False for row in rows),
    }


def render_table(summary: dict[str, object]) -> str:
    rows = summary["results"]
    assert isinstance(rows, list)
    out = command_table(rows)
    over_floor = summary["validate_over_floor_ms"]
    if over_floor is not None:
        out.append(f"validate over the floor: {over_floor:+.1f} ms (median of per-round differences)")
    out.append(
        f"targets: --help median within {TARGET_MS:.0f} ms of bare Python; validate within "
        f"{FLOOR_TARGET_MS:.0f} ms of the floor; {summary['runs']} runs each, interleaved"
    )
    notes = summary["notes"]
    assert isinstance(notes, list)
    out.extend(f"note: {note}" for note in notes)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15, help="timed runs per command (>= 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error("--runs must be at least 2")

    compile_package()
    commands, notes = build_commands()
    run_all(commands, args.runs, args.warmup)
    notes.extend(exit_notes(commands))
    summary = summarise(commands, args.runs, notes)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render_table(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
