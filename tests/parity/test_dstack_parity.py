"""dstackctl accepts exactly the `type: service` files that dstack 0.22.5 accepts.

One case per file (see corpus.all_cases): its id names it. For each, dstackctl's verdict
(load_service_file raises ConfigError or not; warnings do not count) must equal dstack's
(scripts/dstack_parity.py, run once for the whole session), unless differences.py lists the
case: then the verdicts must still differ, so that a difference that goes away is noticed and
its entry removed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from corpus import DSTACK_VERSION, Case, Verdict, all_cases, dstackctl_verdict, known_difference
from differences import KNOWN_DIFFERENCES

pytestmark = pytest.mark.slow

CASES = all_cases()
PENDING = re.compile(r"^pending issue \d+: \S")


def _show(verdict: Verdict) -> str:
    return "accepts" if verdict.accepted else f"rejects ({verdict.error})"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_same_verdict_as_dstack(case: Case, dstack_verdicts: dict[str, Verdict], case_folder: Path) -> None:
    theirs = dstack_verdicts[case.id]
    ours = dstackctl_verdict(case.text, case_folder, case.id)
    reason = known_difference(case.id)
    if reason is None:
        assert ours.accepted == theirs.accepted, (
            f"dstack {DSTACK_VERSION} {_show(theirs)}\nbut dstackctl {_show(ours)}\n"
            f"--- {case.id}\n{case.text}"
        )
    else:
        assert ours.accepted != theirs.accepted, (
            f"known difference gone: dstack and dstackctl both {'accept' if ours.accepted else 'reject'} "
            f"{case.id}; remove its entry from tests/parity/differences.py (reason was: {reason})"
        )


@pytest.mark.parametrize("case", [c for c in CASES if c.kind in ("sample", "example")], ids=lambda c: c.id)
def test_dstack_accepts_samples_and_examples(case: Case, dstack_verdicts: dict[str, Verdict]) -> None:
    """samples/ must run on dstack; the examples were kept because dstack accepted them."""
    verdict = dstack_verdicts[case.id]
    assert verdict.accepted, f"dstack {DSTACK_VERSION} rejects {case.id}: {verdict.error}"


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "case"], ids=lambda c: c.id)
def test_hand_written_case_says_what_dstack_does(case: Case, dstack_verdicts: dict[str, Verdict]) -> None:
    """A hand-written case is named ok-... when dstack accepts it and bad-... when it rejects it."""
    name = case.id.partition("/")[2]
    assert name.startswith(("ok-", "bad-")), f"{case.id}: name it ok-... or bad-..."
    verdict = dstack_verdicts[case.id]
    assert verdict.accepted == name.startswith("ok-"), f"dstack {DSTACK_VERSION} {_show(verdict)}"


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("pattern", list(KNOWN_DIFFERENCES))
def test_known_difference_names_a_case(pattern: str) -> None:
    """Every entry matches some case and gives a sentence as its reason."""
    assert any(re.fullmatch(pattern, case.id) for case in CASES), f"{pattern!r} matches no case"
    reason = KNOWN_DIFFERENCES[pattern]
    assert reason.strip().endswith("."), f"{pattern!r}: the reason should be a sentence"
    if reason.startswith("pending"):
        assert PENDING.match(reason), f"{pattern!r}: write 'pending issue N: why'"
