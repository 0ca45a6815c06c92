"""Parsing of dstack's scalar notations: durations, memory sizes and `A..B` ranges."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

_DURATION = re.compile(r"^(\d+) *([smhdw])$")
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> int:
    """Seconds from dstack's duration forms: `30`, `"30"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`, `"1w"`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        match = _DURATION.match(text)
        if match:
            return int(match.group(1)) * _SECONDS_PER_UNIT[match.group(2)]
    raise ValueError(
        f"expected a duration such as 30s, 5m or 1h (one number and one unit of s, m, h, d, w), got {value!r}"
    )


def format_duration(seconds: int) -> str:
    """The shortest exact dstack form: 90 -> `90s`, 120 -> `2m`, 3600 -> `1h`."""
    for unit in ("w", "d", "h", "m"):
        size = _SECONDS_PER_UNIT[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


_MEMORY = re.compile(r"^(\d+(?:\.\d+)?) *([kmgt]i?b?)?$", re.IGNORECASE)
_GB_PER_UNIT = {"k": 1 / 1024**2, "m": 1 / 1024, "g": 1.0, "t": 1024.0}


def parse_memory_gb(value: object) -> float:
    """Gigabytes from `24GB`, `512MB`, `1TB`, `16` (a bare number means GB, as in dstack)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a memory size such as 24GB or 512MB, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a memory size cannot be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        match = _MEMORY.match(value.strip())
        if match:
            unit = (match.group(2) or "g")[0].lower()
            return float(match.group(1)) * _GB_PER_UNIT[unit]
    raise ValueError(f"expected a memory size such as 24GB or 512MB, got {value!r}")


def format_memory_gb(gb: float) -> str:
    if gb < 1:
        return f"{round(gb * 1024)}MB"
    return f"{gb:g}GB"


T = TypeVar("T", int, float)


@dataclass(frozen=True)
class Range(Generic[T]):
    """An inclusive range; `None` bounds are open (`2..` has no maximum)."""

    min: T | None
    max: T | None

    def __str__(self) -> str:
        return self.render(str)

    def render(self, show: Callable[[T], str]) -> str:
        if self.min is not None and self.min == self.max:
            return show(self.min)
        low = "" if self.min is None else show(self.min)
        high = "" if self.max is None else show(self.max)
        return f"{low}..{high}"

    def contains(self, value: T) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


def parse_count_range(value: object, what: str = "a count") -> Range[int]:
    """`2`, `"2"`, `"1..4"`, `"2.."`, `"..4"` or a `{min, max}` mapping as an integer range."""
    if isinstance(value, bool):
        raise ValueError(f"expected {what} such as 2 or 1..4, got {value!r}")
    if isinstance(value, int):
        return _checked(Range(value, value), what)
    if isinstance(value, dict) and set(value) <= {"min", "max"}:
        low, high = value.get("min"), value.get("max")
        return _checked(
            Range(
                None if low is None else _to_int(low, what),
                None if high is None else _to_int(high, what),
            ),
            what,
        )
    if isinstance(value, str):
        text = value.strip()
        if ".." in text:
            low_text, _, high_text = text.partition("..")
            low_text, high_text = low_text.strip(), high_text.strip()
            if not low_text and not high_text:
                raise ValueError(f"expected {what} such as 2 or 1..4, got {value!r}")
            return _checked(
                Range(
                    _to_int(low_text, what) if low_text else None,
                    _to_int(high_text, what) if high_text else None,
                ),
                what,
            )
        return _checked(Range(_to_int(text, what), _to_int(text, what)), what)
    raise ValueError(f"expected {what} such as 2 or 1..4, got {value!r}")


def parse_memory_range(value: object) -> Range[float]:
    """`24GB`, `"24GB..48GB"`, `"24GB.."`, `"..48GB"` or `{min, max}` as a range in GB."""
    if isinstance(value, dict) and set(value) <= {"min", "max"}:
        low, high = value.get("min"), value.get("max")
        result = Range(
            None if low is None else parse_memory_gb(low),
            None if high is None else parse_memory_gb(high),
        )
    elif isinstance(value, str) and ".." in value:
        low_text, _, high_text = value.strip().partition("..")
        if not low_text.strip() and not high_text.strip():
            raise ValueError(f"expected a memory range such as 24GB..48GB, got {value!r}")
        result = Range(
            parse_memory_gb(low_text) if low_text.strip() else None,
            parse_memory_gb(high_text) if high_text.strip() else None,
        )
    else:
        size = parse_memory_gb(value)
        result = Range(size, size)
    if result.min is not None and result.max is not None and result.min > result.max:
        raise ValueError(f"the range {value!r} has its minimum above its maximum")
    return result


def _to_int(text: object, what: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, str) and text.strip().isdigit():
        return int(text.strip())
    if isinstance(text, str) and text.strip().startswith("-") and text.strip()[1:].isdigit():
        return int(text.strip())  # refused by _checked with its own sentence
    raise ValueError(f"expected {what} such as 2 or 1..4, got {text!r}")


def _checked(result: Range[int], what: str) -> Range[int]:
    if result.min is not None and result.max is not None and result.min > result.max:
        raise ValueError(f"{what} range {result} has its minimum above its maximum")
    if (result.min is not None and result.min < 0) or (result.max is not None and result.max < 0):
        raise ValueError(f"{what} cannot be negative")
    return result
