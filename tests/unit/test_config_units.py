"""dstack's scalar notations, called directly: durations, memory, ranges, GPU specs, `${{ }}`."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dstackctl.config.gpu import GpuSpec, parse_gpu_spec
from dstackctl.config.interpolation import Reference, interpolate, references
from dstackctl.config.units import (
    Range,
    format_duration,
    format_memory_gb,
    parse_count_range,
    parse_duration,
    parse_memory_gb,
    parse_memory_range,
)

# --- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0),
        (30, 30),
        ("30", 30),
        (" 30 ", 30),
        ("30s", 30),
        ("30 s", 30),
        ("1m", 60),
        ("90m", 5400),
        ("2h", 7200),
        ("1d", 86400),
        ("2w", 1209600),
        ("0s", 0),
    ],
)
def test_parse_duration(value: object, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "1m30s",
        "1h30m",
        "5 minutes",
        "5min",
        "1.5h",
        "1.5",
        1.5,
        "-5",
        -5,
        "",
        "s",
        "m5",
        "5x",
        True,
        False,
        None,
        [],
        {},
    ],
    ids=repr,
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError) as exc:
        parse_duration(value)
    message = str(exc.value)
    assert "duration" in message


def test_parse_duration_compound_names_the_forms_it_takes() -> None:
    with pytest.raises(ValueError, match=r"one number and one unit of s, m, h, d, w\), got '1m30s'"):
        parse_duration("1m30s")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1, "1s"),
        (15, "15s"),
        (90, "90s"),
        (120, "2m"),
        (3600, "1h"),
        (5400, "90m"),
        (86400, "1d"),
        (604800, "1w"),
    ],
)
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from("smhdw"), st.sampled_from(["", " ", "  "]))
def test_any_number_and_one_unit(number: int, unit: str, space: str) -> None:
    factor = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert parse_duration(f"{number}{space}{unit}") == number * factor


# --- memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "gb"),
    [
        ("24GB", 24.0),
        ("24gb", 24.0),
        ("24 GB", 24.0),
        ("24G", 24.0),
        ("24GiB", 24.0),
        ("1.5GB", 1.5),
        ("512MB", 0.5),
        ("1024MB", 1.0),
        ("1TB", 1024.0),
        ("1048576KB", 1.0),
        ("16", 16.0),
        (16, 16.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_memory_gb(value: object, gb: float) -> None:
    assert parse_memory_gb(value) == gb


@pytest.mark.parametrize(
    "value",
    ["lots", "", "GB", "24XB", "24B", "1e3GB", "-5GB", -5, -0.5, True, None, [], "24GB..48GB"],
    ids=repr,
)
def test_parse_memory_gb_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="memory size"):
        parse_memory_gb(value)


@pytest.mark.parametrize(
    ("gb", "text"), [(24.0, "24GB"), (1.5, "1.5GB"), (0.5, "512MB"), (1024.0, "1024GB"), (1.0, "1GB")]
)
def test_format_memory_gb(gb: float, text: str) -> None:
    assert format_memory_gb(gb) == text
    assert parse_memory_gb(text) == gb


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("24GB..48GB", Range(24.0, 48.0)),
        ("24GB ..  48GB", Range(24.0, 48.0)),
        ("24GB..", Range(24.0, None)),
        ("..48GB", Range(None, 48.0)),
        ("16GB", Range(16.0, 16.0)),
        (16, Range(16.0, 16.0)),
        ({"min": "8GB"}, Range(8.0, None)),
        ({"min": "8GB", "max": 16}, Range(8.0, 16.0)),
        ("24GB..24GB", Range(24.0, 24.0)),
    ],
)
def test_parse_memory_range(value: object, expected: Range[float]) -> None:
    assert parse_memory_range(value) == expected


@pytest.mark.parametrize(
    "value",
    ["48GB..24GB", "..", " .. ", "24GB..lots", "a..b", {"min": "x"}, {"min": 48, "max": 24}],
    ids=repr,
)
def test_parse_memory_range_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_memory_range(value)


# --- ranges -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2, Range(2, 2)),
        (0, Range(0, 0)),
        ("2", Range(2, 2)),
        ("1..4", Range(1, 4)),
        (" 1 .. 4 ", Range(1, 4)),
        ("2..", Range(2, None)),
        ("..4", Range(None, 4)),
        ("3..3", Range(3, 3)),
        ({"min": 1, "max": 3}, Range(1, 3)),
        ({"min": "1"}, Range(1, None)),
        ({"max": 3}, Range(None, 3)),
    ],
)
def test_parse_count_range(value: object, expected: Range[int]) -> None:
    assert parse_count_range(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "4..1",
        "..",
        "a..b",
        "1..x",
        "1..2..3",
        "-1",
        -1,
        "-1..2",
        1.5,
        "1.5",
        True,
        None,
        "",
        [],
        {"min": 1, "step": 2},
    ],
    ids=repr,
)
def test_parse_count_range_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_count_range(value, "a GPU count")


def test_count_range_messages_name_the_thing() -> None:
    with pytest.raises(ValueError, match=r"a replica count range 4\.\.1 has its minimum above its maximum"):
        parse_count_range("4..1", "a replica count")
    with pytest.raises(ValueError, match="a GPU count cannot be negative"):
        parse_count_range(-1, "a GPU count")


@pytest.mark.parametrize(
    ("r", "text"),
    [
        (Range(2, 2), "2"),
        (Range(1, 4), "1..4"),
        (Range(2, None), "2.."),
        (Range(None, 4), "..4"),
        (Range(None, None), ".."),
    ],
)
def test_range_text(r: Range[int], text: str) -> None:
    assert str(r) == text


def test_range_contains() -> None:
    assert Range(1, 4).contains(1)
    assert Range(1, 4).contains(4)
    assert not Range(1, 4).contains(5)
    assert not Range(1, 4).contains(0)
    assert Range(2, None).contains(10**9)
    assert Range(None, 4).contains(0)
    assert Range(24.0, 48.0).contains(24)


@given(st.integers(0, 10**6), st.integers(0, 10**6) | st.none(), st.booleans())
def test_count_range_round_trip(low: int, high: int | None, open_low: bool) -> None:
    if high is not None and high < low:
        low, high = high, low
    r = Range(None if open_low else low, high)
    if r.min is None and r.max is None:
        return
    assert parse_count_range(str(r)) == r


# --- GPU ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, GpuSpec()),
        (0, GpuSpec(count=Range(0, 0))),
        ("2", GpuSpec(count=Range(2, 2))),
        ("1..2", GpuSpec(count=Range(1, 2))),
        ("2..", GpuSpec(count=Range(2, None))),
        ("A100", GpuSpec(names=("A100",))),
        ("A100:2", GpuSpec(names=("A100",), count=Range(2, 2))),
        ("a100:2", GpuSpec(names=("a100",), count=Range(2, 2))),
        ("A100 : 2", GpuSpec(names=("A100",), count=Range(2, 2))),
        ("2:A100", GpuSpec(names=("A100",), count=Range(2, 2))),
        ("24GB", GpuSpec(memory=Range(24.0, 24.0))),
        ("24GB..48GB", GpuSpec(memory=Range(24.0, 48.0))),
        ("..48GB", GpuSpec(memory=Range(None, 48.0))),
        ("nvidia", GpuSpec(vendor="nvidia")),
        ("NVIDIA:A100", GpuSpec(vendor="nvidia", names=("A100",))),
        ("nvidia:A10G,L4:1..2", GpuSpec(vendor="nvidia", names=("A10G", "L4"), count=Range(1, 2))),
        ("A10G,L4:24GB:2", GpuSpec(names=("A10G", "L4"), memory=Range(24.0, 24.0), count=Range(2, 2))),
        ("H100:80GB:8", GpuSpec(names=("H100",), memory=Range(80.0, 80.0), count=Range(8, 8))),
        ("RTX4090", GpuSpec(names=("RTX4090",))),
        ("tpu:v5litepod-8", GpuSpec(vendor="tpu", names=("v5litepod-8",))),
        ({"name": "A100"}, GpuSpec(names=("A100",))),
        ({"name": "A10G,L4"}, GpuSpec(names=("A10G", "L4"))),
        ({"name": ["A10G", "L4"], "count": "1..2"}, GpuSpec(names=("A10G", "L4"), count=Range(1, 2))),
        ({"vendor": "AMD", "count": 2}, GpuSpec(vendor="amd", count=Range(2, 2))),
        (
            {"memory": "24GB..", "total_memory": "80GB.."},
            GpuSpec(memory=Range(24.0, None), total_memory=Range(80.0, None)),
        ),
        ({"count": {"min": 1, "max": 2}}, GpuSpec(count=Range(1, 2))),
        ({"compute_capability": "8.0"}, GpuSpec()),
    ],
    ids=repr,
)
def test_parse_gpu_spec(value: object, expected: GpuSpec) -> None:
    assert parse_gpu_spec(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("A100:H100", "two name tokens"),
        ("nvidia:amd", "two vendor tokens"),
        ("A100:2:4", "two count tokens"),
        ("24GB:48GB", "two memory tokens"),
        ("", "the GPU spec is empty"),
        ("   ", "the GPU spec is empty"),
        ("A100::2", "empty token"),
        (":A100", "empty token"),
        ("A100:", "empty token"),
        ("A100,,L4", "invalid GPU name list"),
        (",A100", "invalid GPU name list"),
        ("A100!", "invalid GPU name list"),
        ("_x", "invalid GPU name list"),
        ("A100,-", "invalid GPU name list"),
        ("4..2", "minimum above its maximum"),
        ("48GB..24GB", "minimum above its maximum"),
        ("2x", "expected a GPU count"),
        ("-1", "invalid GPU name list"),
        (-1, "cannot be negative"),
        (True, "expected a GPU spec"),
        (None, "expected a GPU spec"),
        (1.5, "expected a GPU spec"),
        (["A100"], "expected a GPU spec"),
        ({"name": "A100", "cnt": 2}, "unknown GPU spec key 'cnt'"),
        ({"vendor": "acme"}, "unknown GPU vendor 'acme'"),
        ({"vendor": 5}, "unknown GPU vendor 5"),
        ({"name": ["A100", ""]}, "expected a GPU name or a list of names"),
        ({"name": 5}, "expected a GPU name or a list of names"),
        ({"count": "x"}, "expected a GPU count"),
        ({"memory": "lots"}, "memory size"),
    ],
    ids=repr,
)
def test_parse_gpu_spec_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_gpu_spec(value)
    assert fragment in str(exc.value)


@pytest.mark.parametrize(
    "spec",
    [
        GpuSpec(),
        GpuSpec(count=Range(0, 0)),
        GpuSpec(vendor="nvidia", names=("A10G", "L4"), count=Range(1, 2), memory=Range(24.0, None)),
        GpuSpec(
            names=("H100",), count=Range(8, 8), memory=Range(80.0, 80.0), total_memory=Range(640.0, None)
        ),
        GpuSpec(count=Range(2, None), memory=Range(None, 48.0)),
        GpuSpec(memory=Range(0.5, 1.5)),
    ],
    ids=str,
)
def test_gpu_spec_mapping_and_text_read_back(spec: GpuSpec) -> None:
    assert parse_gpu_spec(spec.to_dict()) == spec
    if spec.total_memory is None:  # the text form has no place for total memory
        assert parse_gpu_spec(str(spec)) == spec


def test_gpu_text_form() -> None:
    assert str(parse_gpu_spec("24GB..48GB")) == "24GB..48GB:1"
    assert str(parse_gpu_spec("nvidia:A10G,L4:1..2")) == "nvidia:A10G,L4:1..2"
    assert str(parse_gpu_spec(2)) == "2"


def test_wants_gpus() -> None:
    assert parse_gpu_spec(1).wants_gpus
    assert parse_gpu_spec("0..2").wants_gpus
    assert parse_gpu_spec("1..").wants_gpus
    assert not parse_gpu_spec(0).wants_gpus
    assert not parse_gpu_spec("0").wants_gpus


# --- interpolation ------------------------------------------------------------------------


ENV = ("env",)
BOTH = ("secrets", "env")


@pytest.mark.parametrize(
    ("text", "refs"),
    [
        ("", []),
        ("plain", []),
        ("$HOME ${HOME} $", []),
        ("${{ env.A }}", [Reference("env", "A")]),
        ("${{env.A}}", [Reference("env", "A")]),
        ("${{   env._a_1   }}", [Reference("env", "_a_1")]),
        ("Bearer ${{ env.A }}/${{ env.B }}", [Reference("env", "A"), Reference("env", "B")]),
        ("$${{ env.A }}", []),
        ("$$$${{ env.A }}", []),
        ("$$$${{ env.A }}$", []),
        ("$$${{ env.A }}", [Reference("env", "A")]),
        ("${{ env.A }}}", [Reference("env", "A")]),
        ("line1\n${{ env.A }}\nline3", [Reference("env", "A")]),
    ],
)
def test_references(text: str, refs: list[Reference]) -> None:
    assert references(text, ENV) == refs


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("${{ env.A", "unterminated '${{'"),
        ("x ${{ env.A }", "unterminated '${{'"),
        ("${{", "unterminated '${{'"),
        ("${{ }}", "cannot read '${{ }}'"),
        ("${{ env }}", "cannot read '${{ env }}'"),
        ("${{ env.1A }}", "cannot read"),
        ("${{ env.A.B }}", "cannot read"),
        ("${{ env.A-B }}", "cannot read"),
        ("${{ Env.A }}", "cannot read"),
        ("${{ env.A }} ${{ foo.X }}", "unknown namespace 'foo' in ${{ foo.X }}; use ${{ env.NAME }}"),
        ("${{ secrets.X }}", "unknown namespace 'secrets'"),
    ],
)
def test_references_reject(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as exc:
        references(text, ENV)
    assert fragment in str(exc.value)


@pytest.mark.parametrize("text", ["topsecret ${{ env.A", "topsecret ${{ nope.A }}"])
def test_scanner_errors_do_not_quote_the_text(text: str) -> None:
    with pytest.raises(ValueError) as exc:
        references(text, ENV)
    assert "topsecret" not in str(exc.value)


def test_both_namespaces() -> None:
    assert references("${{ secrets.S }}-${{ env.E }}", BOTH) == [
        Reference("secrets", "S"),
        Reference("env", "E"),
    ]
    assert str(Reference("secrets", "S")) == "${{ secrets.S }}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${{ env.A }}", "a"),
        ("x${{env.A}}y${{ env.B }}z", "xaybz"),
        ("$$", "$"),
        ("$$$$", "$$"),
        ("$$${{ env.A }}", "$a"),
        ("$${{ env.A }}", "${{ env.A }}"),
        ("cost $5", "cost $5"),
        ("${{ env.DOLLARS }}", "$$ and ${{ env.A }}"),  # values are not interpolated again
        ("", ""),
    ],
)
def test_interpolate(text: str, expected: str) -> None:
    values = {"env": {"A": "a", "B": "b", "DOLLARS": "$$ and ${{ env.A }}"}}
    assert interpolate(text, values, ENV) == expected


def test_interpolate_missing_raises_key_error_with_the_reference() -> None:
    with pytest.raises(KeyError) as exc:
        interpolate("${{ env.A }}${{ env.MISSING }}", {"env": {"A": "a"}}, ENV)
    assert exc.value.args[0] == Reference("env", "MISSING")


@given(st.text(alphabet=st.sampled_from("ab$ {}.env\n"), max_size=40))
def test_text_without_references_interpolates_to_itself_once_escaped(text: str) -> None:
    escaped = text.replace("$", "$$")
    assert references(escaped, ENV) == []
    assert interpolate(escaped, {"env": {}}, ENV) == text


@given(st.text(max_size=60))
def test_scanner_either_reads_or_raises_value_error(text: str) -> None:
    try:
        refs = references(text, BOTH)
    except ValueError as exc:
        assert str(exc)
        return
    values: dict[str, Any] = {"env": {r.name: "v" for r in refs}, "secrets": {r.name: "s" for r in refs}}
    interpolate(text, values, BOTH)
