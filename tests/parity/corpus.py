"""Every file the parity tier compares, with a stable id, and dstackctl's verdict on one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cases import CASES
from differences import KNOWN_DIFFERENCES
from generated import generated_cases

from dstackctl.config.issues import ConfigError
from dstackctl.config.loader import load_service_file

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = REPO_ROOT / "samples"
EXAMPLES = REPO_ROOT / "tests" / "data" / "dstack_examples"
PARITY_SCRIPT = REPO_ROOT / "scripts" / "dstack_parity.py"
DSTACK_VERSION = "0.22.5"


@dataclass(frozen=True)
class Case:
    id: str  # sample/<file>, example/<file>, case/<id from cases.py>, gen/<axes>
    text: str

    @property
    def kind(self) -> str:
        return self.id.partition("/")[0]


def all_cases() -> list[Case]:
    found = [Case(f"sample/{path.name}", path.read_text()) for path in sorted(SAMPLES.glob("*.yml"))]
    found += [Case(f"example/{path.stem}", path.read_text()) for path in sorted(EXAMPLES.glob("*.yml"))]
    found += [Case(f"case/{case_id}", text) for case_id, text in CASES]
    found += [Case(case_id, text) for case_id, text in generated_cases()]
    return found


def known_difference(case_id: str) -> str | None:
    """The reason given by the first KNOWN_DIFFERENCES pattern that matches the whole id, or None."""
    for pattern, reason in KNOWN_DIFFERENCES.items():
        if re.fullmatch(pattern, case_id):
            return reason
    return None


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    error: str | None


def dstackctl_verdict(text: str, folder: Path, name: str) -> Verdict:
    """dstackctl's verdict on `text`, loaded from a file in `folder` like `dstackctl apply` does.
    Warnings do not count; any exception other than ConfigError propagates (a crash is a bug)."""
    path = folder / (name.replace("/", "__") + ".yml")
    path.write_text(text)
    try:
        load_service_file(path)
    except ConfigError as exc:
        return Verdict(False, str(exc).replace(str(path), "<file>"))
    return Verdict(True, None)
