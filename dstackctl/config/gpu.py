"""dstack's GPU spec: `1`, `A100:2`, `24GB..48GB`, `nvidia:A10G,L4:1..2`, or a mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dstackctl.config.units import (
    Range,
    format_memory_gb,
    parse_count_range,
    parse_memory_range,
)

VENDORS = ("nvidia", "amd", "intel", "tpu")
_OBJECT_KEYS = {"vendor", "name", "count", "memory", "total_memory", "compute_capability"}


@dataclass(frozen=True)
class GpuSpec:
    """What one replica asks for. `count` defaults to exactly one GPU, as in dstack."""

    vendor: str | None = None
    names: tuple[str, ...] = ()
    count: Range[int] = field(default_factory=lambda: Range(1, 1))
    memory: Range[float] | None = None
    total_memory: Range[float] | None = None

    def __str__(self) -> str:
        tokens: list[str] = []
        if self.vendor:
            tokens.append(self.vendor)
        if self.names:
            tokens.append(",".join(self.names))
        if self.memory:
            tokens.append(self.memory.render(format_memory_gb))
        tokens.append(str(self.count))
        return ":".join(tokens)

    def to_dict(self) -> dict[str, Any]:
        """The mapping form, which `parse_gpu_spec` reads back to an equal spec."""
        result: dict[str, Any] = {"count": str(self.count)}
        if self.vendor:
            result["vendor"] = self.vendor
        if self.names:
            result["name"] = list(self.names)
        if self.memory:
            result["memory"] = self.memory.render(format_memory_gb)
        if self.total_memory:
            result["total_memory"] = self.total_memory.render(format_memory_gb)
        return result

    @property
    def wants_gpus(self) -> bool:
        return self.count.max is None or self.count.max > 0


def parse_gpu_spec(value: object) -> GpuSpec:
    if isinstance(value, GpuSpec):
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected a GPU spec such as 1, A100:2 or 24GB..48GB, got {value!r}")
    if isinstance(value, int):
        return GpuSpec(count=parse_count_range(value, "a GPU count"))
    if isinstance(value, dict):
        return _parse_mapping(value)
    if isinstance(value, str):
        return _parse_string(value)
    raise ValueError(f"expected a GPU spec such as 1, A100:2 or 24GB..48GB, got {value!r}")


def _parse_string(text: str) -> GpuSpec:
    if not text.strip():
        raise ValueError("the GPU spec is empty; write a count (1), a name (A100) or a memory (24GB)")
    parts: dict[str, Any] = {}
    for token in text.replace(" ", "").split(":"):
        kind, parsed = _classify(token, text)
        if kind in parts:
            raise ValueError(
                f"the GPU spec {text!r} has two {kind} tokens; "
                f"separate alternatives with commas (A100,H100), not colons"
            )
        parts[kind] = parsed
    return GpuSpec(
        vendor=parts.get("vendor"),
        names=parts.get("name", ()),
        count=parts.get("count", Range(1, 1)),
        memory=parts.get("memory"),
    )


def _classify(token: str, text: str) -> tuple[str, Any]:
    if not token:
        raise ValueError(f"the GPU spec {text!r} has an empty token between colons")
    lowered = token.lower()
    if lowered in VENDORS:
        return "vendor", lowered
    if token[0].isdigit() or token.startswith(".."):
        if "b" in lowered:
            return "memory", parse_memory_range(token)
        return "count", parse_count_range(token, "a GPU count")
    names = tuple(name for name in token.split(","))
    if any(not name[:1].isalpha() or not name.replace("-", "").replace("_", "").isalnum() for name in names):
        raise ValueError(f"the GPU spec {text!r} has an invalid GPU name list {token!r}")
    return "name", names


def _parse_mapping(value: dict[Any, Any]) -> GpuSpec:
    unknown = set(value) - _OBJECT_KEYS
    if unknown:
        raise ValueError(
            f"unknown GPU spec key {sorted(map(str, unknown))[0]!r}; "
            f"expected {', '.join(sorted(_OBJECT_KEYS))}"
        )
    vendor = value.get("vendor")
    if vendor is not None and (not isinstance(vendor, str) or vendor.lower() not in VENDORS):
        raise ValueError(f"unknown GPU vendor {vendor!r}; expected one of {', '.join(VENDORS)}")
    raw_names = value.get("name")
    if raw_names is None:
        names: tuple[str, ...] = ()
    elif isinstance(raw_names, str):
        names = tuple(raw_names.split(","))
    elif isinstance(raw_names, list) and all(isinstance(n, str) and n for n in raw_names):
        names = tuple(raw_names)
    else:
        raise ValueError(f"expected a GPU name or a list of names, got {raw_names!r}")
    count = value.get("count")
    memory = value.get("memory")
    total = value.get("total_memory")
    return GpuSpec(
        vendor=vendor.lower() if isinstance(vendor, str) else None,
        names=names,
        count=Range(1, 1) if count is None else parse_count_range(count, "a GPU count"),
        memory=None if memory is None else parse_memory_range(memory),
        total_memory=None if total is None else parse_memory_range(total),
    )
