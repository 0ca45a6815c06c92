"""Small helpers for sentences shown to users."""

from __future__ import annotations


def decimal(value: float) -> str:
    """`1.5`, `0.03`, `10`: at most two decimals, without trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def replicas_of(low: int, high: int) -> str:
    """`2 replicas`, or `0..4 replicas, autoscaled` for a range."""
    return count_of(low, "replica") if low == high else f"{low}..{high} replicas, autoscaled"


def count_of(count: int, noun: str) -> str:
    """`1 replica`, `2 replicas`, `0 replicas`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
