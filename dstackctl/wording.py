"""Small helpers for sentences shown to users."""

from __future__ import annotations


def count_of(count: int, noun: str) -> str:
    """`1 replica`, `2 replicas`, `0 replicas`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
