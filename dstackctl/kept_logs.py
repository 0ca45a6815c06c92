"""The replicas' output as the agent keeps it in the service folder, so that `logs` works after
`stop` and for replaced replicas (as dstack keeps the logs of finished runs).

One file per container, `logs/GROUP.REPLICA.DEPLOYMENT.CONTAINER.log`; each line starts with
Docker's timestamp, normalized to nanoseconds so that lines compare as text. A file over
MAX_BYTES is rotated once (`.1`): at most 2 x MAX_BYTES per container; a service keeps the
files of its newest KEEP_CONTAINERS containers. Secrets are masked before they are written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LOGS_DIR = "logs"
MAX_BYTES = 5 * 1024 * 1024
KEEP_CONTAINERS = 64
_NAME = re.compile(
    r"^(?P<group>[a-z0-9][a-z0-9-]*)\.(?P<replica>\d+)\.(?P<deployment>\d+)\.(?P<id>[0-9a-f]+)\.log$"
)
_STAMP = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z ")


@dataclass(frozen=True)
class KeptLog:
    path: Path
    group: str
    replica_num: int
    deployment_num: int
    container: str

    @classmethod
    def parse(cls, path: Path) -> KeptLog | None:
        match = _NAME.match(path.name)
        if match is None:
            return None
        return cls(path, match["group"], int(match["replica"]), int(match["deployment"]), match["id"])

    def lines(self) -> list[bytes]:
        """Every kept line (with its timestamp), the rotated part first."""
        found: list[bytes] = []
        for part in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                found += part.read_bytes().splitlines(keepends=True)
            except OSError:
                continue
        return found


# A short value is masked only where it stands alone and only when its name says it is a
# secret: `PIN=987` is, but `WORKERS=2` masking every lone "2" would garble the logs.
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASS|PIN|AUTH|CREDENTIAL|PRIVATE|CERT", re.IGNORECASE)


@dataclass(frozen=True)
class Masks:
    """What masking replaces with ***: every env value of 4 characters or more (longest
    first), and short values of secret-looking names as whole words."""

    values: tuple[bytes, ...] = ()
    short: re.Pattern[bytes] | None = None


def secret_masks(*envs: Mapping[str, str]) -> Masks:
    pairs = [(name, str(value)) for env in envs for name, value in env.items()]
    values = sorted({v.encode() for _, v in pairs if len(v) >= 4}, key=len, reverse=True)
    short = sorted(
        {v.encode() for name, v in pairs if 0 < len(v) < 4 and _SECRET_NAME.search(name)},
        key=len,
        reverse=True,
    )
    pattern = None
    if short:
        words = b"|".join(re.escape(value) for value in short)
        pattern = re.compile(rb"(?<![A-Za-z0-9])(?:" + words + rb")(?![A-Za-z0-9])")
    return Masks(tuple(values), pattern)


def masked(line: bytes, masks: Masks) -> bytes:
    for secret in masks.values:
        line = line.replace(secret, b"***")
    return masks.short.sub(b"***", line) if masks.short is not None else line


def file_name(group: str, replica_num: int, deployment_num: int, container_id: str) -> str:
    return f"{group}.{replica_num}.{deployment_num}.{container_id[:12]}.log"


def kept_logs(folder: Path) -> list[KeptLog]:
    """The service's kept logs, oldest container first."""
    try:
        paths = [p for p in folder.iterdir() if p.name.endswith(".log")]
    except OSError:
        return []
    logs = [log for log in (KeptLog.parse(p) for p in paths) if log is not None]
    return sorted(logs, key=lambda log: (_mtime(log.path), log.path.name))


def stamped(line: bytes) -> tuple[bytes, bytes] | None:
    """(normalized timestamp, text) of a line Docker gave with `timestamps`; None without one."""
    match = _STAMP.match(line)
    if match is None:
        return None
    fraction = (match.group(2) or b"").ljust(9, b"0")
    return match.group(1) + b"." + fraction + b"Z", line[match.end() :]


def text_of(line: bytes) -> bytes:
    """A kept line without its timestamp."""
    parts = stamped(line)
    return parts[1] if parts else line


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
