"""The machine's NVIDIA GPUs, matched against dstack GPU specs and assigned to replicas.

Discovery asks `nvidia-smi` (or the program named by DSTACKCTL_NVIDIA_SMI); no GPUs or no
`nvidia-smi` is a normal answer, an empty list. Memory is compared as cards are sold: an
A10G reports 23028 MiB but is a 24GB card, and people write `24GB..48GB` meaning it.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from dstackctl.config.gpu import GpuSpec
from dstackctl.config.units import Range
from dstackctl.errors import DstackctlError
from dstackctl.wording import count_of

NVIDIA_SMI_VARIABLE = "DSTACKCTL_NVIDIA_SMI"
QUERY = ["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
# Sizes cards are sold with, in GB; a reported size rounds up to the next of these.
SOLD_SIZES_GB = (8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 141, 180, 192)


class GpuError(DstackctlError):
    pass


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_mib: int
    vendor: str = "nvidia"

    @property
    def memory_gb(self) -> int:
        """The size the card is sold as."""
        reported = self.memory_mib / 1024
        for size in SOLD_SIZES_GB:
            if reported <= size:
                return size
        return math.ceil(reported)

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "uuid": self.uuid, "name": self.name, "memory_gb": self.memory_gb}

    def __str__(self) -> str:
        return f"{self.name} {self.memory_gb}GB"


def discover(program: str | None = None, timeout: float = 10.0) -> list[Gpu]:
    """The machine's GPUs; an empty list when there are none or nvidia-smi is missing or fails."""
    command = program or os.environ.get(NVIDIA_SMI_VARIABLE) or "nvidia-smi"
    try:
        result = subprocess.run(
            [command, *QUERY], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    return parse_query(result.stdout)


def parse_query(text: str) -> list[Gpu]:
    gpus = []
    for row in csv.reader(line for line in text.splitlines() if line.strip()):
        fields = [field.strip() for field in row]
        if len(fields) < 4:
            continue
        try:
            gpus.append(Gpu(int(fields[0]), fields[1], fields[2], int(float(fields[3]))))
        except ValueError:
            continue
    return gpus


def _name_matches(wanted: str, gpu: Gpu) -> bool:
    """Case-insensitive, by whole tokens of the reported name: `A100` matches
    `NVIDIA A100-SXM4-80GB` but `A10` does not match `NVIDIA A10G`; `RTX4090` matches
    `NVIDIA GeForce RTX 4090`."""
    want = wanted.lower().replace(" ", "").replace("-", "")
    tokens = gpu.name.lower().replace("-", " ").split()
    pairs = [a + b for a, b in itertools.pairwise(tokens)]
    return want in tokens or want in pairs


def matches(spec: GpuSpec, gpu: Gpu) -> bool:
    if spec.vendor and spec.vendor != gpu.vendor:
        return False
    if spec.names and not any(_name_matches(name, gpu) for name in spec.names):
        return False
    return not (spec.memory and not spec.memory.contains(float(gpu.memory_gb)))


def describe_spec(spec: GpuSpec, replicas: int = 1) -> str:
    """`2 x 24GB..48GB` (all replicas together), or `1..2 x A10G,L4 each` for a range."""
    what = []
    if spec.names:
        what.append(",".join(spec.names))
    if spec.memory:
        what.append(spec.memory.render(lambda gb: f"{gb:g}GB"))
    kind = ":".join(what) or "GPU"
    if spec.count.min is not None and spec.count.min == spec.count.max:
        return f"{spec.count.min * replicas} x {kind}"
    return f"{spec.count} x {kind} each"


def describe_found(gpus: Iterable[Gpu]) -> str:
    counts: dict[str, int] = {}
    for gpu in gpus:
        counts[str(gpu)] = counts.get(str(gpu), 0) + 1
    return ", ".join(f"{n} x {label}" for label, n in counts.items()) or "no NVIDIA GPU"


def choose(spec: GpuSpec, gpus: list[Gpu], taken: set[str]) -> list[Gpu] | None:
    """GPUs for one replica: the largest count the range allows, all of one model, all free.

    None when no choice satisfies the spec.
    """
    free = [g for g in gpus if g.uuid not in taken and matches(spec, g)]
    by_model: dict[tuple[str, int], list[Gpu]] = {}
    for gpu in sorted(free, key=lambda g: g.index):
        by_model.setdefault((gpu.name, gpu.memory_gb), []).append(gpu)
    best: list[Gpu] | None = None
    for group in by_model.values():
        count = _largest_count(spec.count, len(group))
        if count is None:
            continue
        chosen = group[:count]
        if spec.total_memory and not spec.total_memory.contains(float(sum(g.memory_gb for g in chosen))):
            continue
        if best is None or len(chosen) > len(best):
            best = chosen
    return best


def _largest_count(count: Range[int], available: int) -> int | None:
    high = available if count.max is None else min(count.max, available)
    low = count.min or 0
    return high if high >= low and high > 0 else None


def assign(spec: GpuSpec, gpus: list[Gpu], replicas: int, taken: set[str]) -> list[list[Gpu]]:
    """GPUs for every replica, none shared; raises GpuError saying what is missing."""
    used = set(taken)
    result = []
    for _ in range(replicas):
        chosen = choose(spec, gpus, used)
        if chosen is None:
            raise GpuError(shortage_message(spec, gpus, replicas, taken))
        used.update(g.uuid for g in chosen)
        result.append(chosen)
    return result


def shortage_message(spec: GpuSpec, gpus: list[Gpu], replicas: int, taken: set[str]) -> str:
    wanted = f"needs {describe_spec(spec, replicas)} for {count_of(replicas, 'replica')}"
    if not gpus:
        return f"{wanted}; found no NVIDIA GPU on this machine (nvidia-smi lists none)"
    matching = [g for g in gpus if matches(spec, g)]
    busy = [g for g in matching if g.uuid in taken]
    text = f"{wanted}; found {describe_found(gpus)}"
    if busy:
        text += f" ({len(busy)} matching in use by other replicas)"
    return text
