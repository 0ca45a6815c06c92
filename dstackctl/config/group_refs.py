"""`${{ groups[i].replicas[j].IP_ADDRESS }}` in a service's commands, as dstack 0.22.5 has it.

From `dstack/_internal/utils/nodes_interpolator.py` and `server/services/runs/spec.py`
(`_validate_groups_ip_refs`): only in `commands` (not in `env`), `replicas` (not `nodes`) for a
service, indexes within the groups' minimum counts, and never a group that scales to zero. A
replica that refers to others starts once their addresses are known
(`jobs_running._substitute_groups_ip_refs`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from dstackctl.wording import count_of

_REF = re.compile(r"(?<!\$)\$\{\{\s*groups\[(\d+)\]\.replicas\[(\d+)\]\.IP_ADDRESS\s*\}\}")
_ANY = re.compile(r"(?<!\$)\$\{\{\s*([^}]+?)\s*\}\}")
_NAME = re.compile(r"groups\[\d+\]\.(replicas|nodes)\[\d+\]\.IP_ADDRESS")


def has_refs(text: str) -> bool:
    return any(_is_groups(m.group(1)) for m in _ANY.finditer(text))


def refs(text: str) -> list[tuple[int, int]]:
    """(group index, replica index) of every address `text` refers to."""
    return [(int(m.group(1)), int(m.group(2))) for m in _REF.finditer(text)]


def ref_problems(text: str, group_minimums: list[int]) -> list[str]:
    """Sentences for the references in `text` that dstack refuses, given each group's minimum."""
    found = []
    for match in _ANY.finditer(text):
        name = match.group(1).strip()
        if not _is_groups(name):
            continue
        shape = _NAME.fullmatch(name)
        if shape is None or shape.group(1) != "replicas":
            found.append(
                f"${{{{ {name} }}}} is not a reference dstack knows; write groups[I].replicas[J].IP_ADDRESS"
            )
    for group, replica in refs(text):
        where = f"groups[{group}].replicas[{replica}].IP_ADDRESS"
        if group < len(group_minimums) and group_minimums[group] == 0:
            found.append(f"{where}: group {group} scales to zero, so no replica of it is sure to exist")
        elif group >= len(group_minimums) or replica >= group_minimums[group]:
            found.append(f"{where} is out of range: the service has {_sizes(group_minimums)}")
    return found


def fill(text: str, address: Callable[[int, int], str | None]) -> tuple[str, list[str]]:
    """`text` with each reference replaced by the address; and the references still unknown."""
    missing: list[str] = []

    def one(match: re.Match[str]) -> str:
        group, replica = int(match.group(1)), int(match.group(2))
        found = address(group, replica)
        if found is None:
            missing.append(f"groups[{group}].replicas[{replica}]")
            return match.group(0)
        return found

    return _REF.sub(one, text), missing


def _is_groups(name: str) -> bool:
    return re.split(r"[.\[]", name.strip(), maxsplit=1)[0] == "groups"


def _sizes(minimums: list[int]) -> str:
    groups = ", ".join(f"group {i} {count_of(n, 'replica')}" for i, n in enumerate(minimums))
    return f"{count_of(len(minimums), 'group')} ({groups})"
