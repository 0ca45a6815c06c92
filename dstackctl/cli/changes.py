"""What `apply`/`run` of a file would change in a running service, and asking before doing it.

dstack's `apply` shows the plan for an existing run and asks; `-y` goes ahead. Without a
terminal there is nobody to ask: exit 2 with how to go ahead, never a silent rollover.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from dstackctl.errors import DstackctlError, ExitCode

_SHOWN = 60  # characters of a changed value shown


def config_changes(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    old_counts: Mapping[str, int],
    new_counts: Mapping[str, int],
    env_changed: bool,
) -> list[str]:
    """One line per top-level key that differs (`image: a -> b`); env by names only."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in ("replicas", "groups") or old.get(key) == new.get(key):
            continue
        if key == "env":
            lines.append(f"env: {_names(old.get(key))} -> {_names(new.get(key))}")
        else:
            lines.append(f"{key}: {_show(old.get(key))} -> {_show(new.get(key))}")
    if _groups(old) != _groups(new):
        lines.append("replica groups: their definitions change")
    if dict(old_counts) != dict(new_counts):
        lines.append(f"replicas: {_counts(old_counts)} -> {_counts(new_counts)}")
    if env_changed and not any(line.startswith("env:") for line in lines):
        lines.append("env: values change (not shown)")
    return lines or ["(nothing in the file; the values it runs with change)"]


def confirm_update(service: str, changes: list[str], yes: bool) -> None:
    """Go ahead with -y; ask on a terminal; else exit 2 saying how to go ahead."""
    if yes:
        return
    sys.stderr.write(f"{service} is running with another configuration; this file changes:\n")
    sys.stderr.writelines(f"  {line}\n" for line in changes)
    if not sys.stdin.isatty():
        raise DstackctlError(
            f"{service} is running with another configuration; pass -y to update it "
            f"(`dstackctl apply -y -f FILE`), or give this one another name with -n NAME",
            ExitCode.USAGE,
        )
    if not _confirmed(f"Update {service}?"):
        raise DstackctlError(f"{service} was not updated; it keeps running as it was", ExitCode.INTERRUPTED)


def _confirmed(question: str) -> bool:
    """Ask on the terminal (the question on stderr, like the rest of the words); only y or
    yes goes ahead; an empty answer or end of input does not; Ctrl-C interrupts."""
    while True:
        sys.stderr.write(f"{question} [y/N]: ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        answer = line.strip().lower()
        if not line or answer in ("", "n", "no"):
            return False
        if answer in ("y", "yes"):
            return True
        sys.stderr.write("Answer y or n.\n")


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


def _names(env: Any) -> str:
    names = [str(entry).partition("=")[0] for entry in env or []]
    return "[" + ", ".join(names) + "]"


def _groups(config: Mapping[str, Any]) -> Any:
    groups = config.get("groups")
    if groups is None and isinstance(config.get("replicas"), list):
        groups = config["replicas"]
    if not isinstance(groups, list):
        return None
    return [
        {k: v for k, v in g.items() if k not in ("count", "replicas")} for g in groups if isinstance(g, dict)
    ]


def _counts(counts: Mapping[str, int]) -> str:
    if list(counts) == ["0"]:
        return str(counts["0"])
    return ", ".join(f"{name}: {count}" for name, count in counts.items())
