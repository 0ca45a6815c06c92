"""A problem (or warning) at a place in a configuration file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dstackctl.errors import DstackctlError, ExitCode

Loc = tuple[str | int, ...]


def dotted(loc: Loc) -> str:
    """`("probes", 0, "timeout")` -> `probes[0].timeout`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


@dataclass(frozen=True)
class Issue:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(DstackctlError):
    """An invalid configuration: every problem found in one file."""

    exit_code = ExitCode.USAGE

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))
