"""GPU discovery (fake nvidia-smi), matching and assignment over a table of specs and machines."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dstackctl.config.gpu import parse_gpu_spec
from dstackctl.gpus import Gpu, GpuError, assign, choose, discover, matches, parse_query

A10G = "NVIDIA A10G, 23028"
L4 = "NVIDIA L4, 23034"
A100_80 = "NVIDIA A100-SXM4-80GB, 81920"
A100_40 = "NVIDIA A100-SXM4-40GB, 40960"
H100 = "NVIDIA H100 80GB HBM3, 81559"
RTX4090 = "NVIDIA GeForce RTX 4090, 24564"
T4 = "Tesla T4, 15360"
A6000 = "NVIDIA RTX A6000, 49140"


def machine(*cards: str) -> list[Gpu]:
    lines = [f"{i}, GPU-{i:04d}, {card}" for i, card in enumerate(cards)]
    return parse_query("\n".join(lines))


# (spec, machine, replicas, expected GPU indexes per replica, or None when it must fail)
CASES = [
    ("1", [A10G], 1, [[0]]),
    (1, [A10G, A10G], 2, [[0], [1]]),
    ("2", [A10G, A10G], 1, [[0, 1]]),
    ("2", [A10G], 1, None),
    ("A10G", [A10G], 1, [[0]]),
    ("a10g", [A10G], 1, [[0]]),
    ("A10", [A10G], 1, None),
    ("A100", [A100_80], 1, [[0]]),
    ("A100", [A10G, A100_40], 1, [[1]]),
    ("A100:80GB", [A100_40, A100_80], 1, [[1]]),
    ("A100:40GB", [A100_40, A100_80], 1, [[0]]),
    ("H100,A100", [H100, A10G], 1, [[0]]),
    ("A10G,L4:24GB:2", [A10G, L4, A10G], 1, [[0, 2]]),
    ("A10G,L4:1..2", [L4, A10G], 2, [[0], [1]]),
    ("nvidia:A10G,L4:1..2", [A10G, A10G, L4], 1, [[0, 1]]),
    ("amd:1", [A10G], 1, None),
    ("24GB..48GB", [A10G, A10G], 2, [[0], [1]]),
    ("24GB..48GB", [A10G], 2, None),
    ("24GB..48GB", [T4], 1, None),
    ("24GB..48GB", [A6000], 1, [[0]]),
    ("24GB..48GB", [H100], 1, None),
    ("80GB", [H100], 1, [[0]]),
    ("80GB", [A100_80, H100], 2, [[0], [1]]),
    ("16GB", [T4], 1, [[0]]),
    ("40GB..", [A10G, A100_40], 1, [[1]]),
    ("..24GB", [A10G, A100_40], 1, [[0]]),
    ("RTX4090", [RTX4090], 1, [[0]]),
    ("rtx4090:24GB", [RTX4090], 1, [[0]]),
    ("A6000", [A6000], 1, [[0]]),
    ("T4", [T4], 1, [[0]]),
    ("1..4", [A10G, A10G, A10G], 1, [[0, 1, 2]]),
    ("1..4", [A10G, A10G, A10G], 2, [[0, 1, 2], None]),
    ("2..", [A10G, A10G, A10G, A10G], 2, [[0, 1, 2, 3], None]),
    ("2..2", [A10G, A10G, A10G, A10G], 2, [[0, 1], [2, 3]]),
    ("1..2", [A10G, L4, L4], 1, [[1, 2]]),
    ({"name": ["A100"], "count": "2", "memory": "40GB.."}, [A100_80, A100_80, A10G], 1, [[0, 1]]),
    ({"count": 2, "total_memory": "96GB.."}, [A10G, A10G], 1, None),
    ({"count": 2, "total_memory": "48GB.."}, [A10G, A10G], 1, [[0, 1]]),
    ("1", [], 1, None),
]


def _expected_failure(expected: list[list[int] | None] | None) -> bool:
    return expected is None or any(part is None for part in expected)


@pytest.mark.parametrize(
    ("spec_text", "cards", "replicas", "expected"),
    CASES,
    ids=[f"{c[0]}-{len(c[1])}gpu-{c[2]}rep" for c in CASES],
)
def test_assignment_table(
    spec_text: object, cards: list[str], replicas: int, expected: list[list[int] | None] | None
) -> None:
    spec = parse_gpu_spec(spec_text)
    gpus = machine(*cards)
    if _expected_failure(expected):
        with pytest.raises(GpuError) as caught:
            assign(spec, gpus, replicas, set())
        assert caught.value.message.startswith("needs ")
        assert f"for {replicas} replica" in caught.value.message
        if expected is not None:  # the replicas before the failing one still had a choice
            first = choose(spec, gpus, set())
            assert first is not None and [g.index for g in first] == expected[0]
        return
    assert expected is not None
    assigned = assign(spec, gpus, replicas, set())
    assert [[g.index for g in part] for part in assigned] == expected
    used = [g.uuid for part in assigned for g in part]
    assert len(used) == len(set(used))  # never shared


def test_sold_sizes_round_up() -> None:
    sizes = [g.memory_gb for g in machine(A10G, L4, A100_80, A100_40, H100, RTX4090, T4, A6000)]
    assert sizes == [24, 24, 80, 40, 80, 24, 16, 48]


def test_taken_gpus_are_not_offered_again() -> None:
    gpus = machine(A10G, A10G)
    assert choose(parse_gpu_spec("1"), gpus, {"GPU-0000"}) == [gpus[1]]
    with pytest.raises(GpuError, match=r"1 matching in use by other replicas"):
        assign(parse_gpu_spec("2"), gpus, 1, {"GPU-0000"})


def test_shortage_message_names_what_was_found() -> None:
    with pytest.raises(GpuError) as caught:
        assign(parse_gpu_spec("24GB..48GB"), machine(A10G), 2, set())
    assert caught.value.message == "needs 2 x 24GB..48GB for 2 replicas; found 1 x NVIDIA A10G 24GB"


def test_vendor_and_names_are_checked() -> None:
    (gpu,) = machine(A10G)
    assert matches(parse_gpu_spec("nvidia:1"), gpu)
    assert not matches(parse_gpu_spec("L4"), gpu)


def _fake_smi(tmp_path: Path, body: str, code: int = 0) -> str:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'OUT'\n{body}\nOUT\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_discover_reads_a_fake_nvidia_smi(tmp_path: Path) -> None:
    program = _fake_smi(tmp_path, "0, GPU-aaa, NVIDIA A10G, 23028\n1, GPU-bbb, NVIDIA A10G, 23028")
    gpus = discover(program)
    assert [(g.index, g.uuid, g.name, g.memory_gb) for g in gpus] == [
        (0, "GPU-aaa", "NVIDIA A10G", 24),
        (1, "GPU-bbb", "NVIDIA A10G", 24),
    ]


def test_discover_reads_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTACKCTL_NVIDIA_SMI", _fake_smi(tmp_path, "0, GPU-x, NVIDIA L4, 23034"))
    assert [g.name for g in discover()] == ["NVIDIA L4"]


def test_no_nvidia_smi_or_a_failing_one_is_an_empty_list(tmp_path: Path) -> None:
    assert discover(str(tmp_path / "missing")) == []
    assert discover(_fake_smi(tmp_path, "NVIDIA-SMI has failed", code=9)) == []
    assert parse_query("garbage\n\n1,2\n") == []
