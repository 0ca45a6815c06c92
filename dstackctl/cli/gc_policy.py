"""The console script's garbage-collector policy.

A command imports typer, pydantic and docker-py: some 100,000 objects that live until the
process exits. Python's collector scans them over and over while they are created, and once
more at interpreter shutdown (50-100 ms with all three loaded), and frees nothing. So the
console script pauses collection at start and freezes what exists before it exits (frozen
objects are never scanned again). A command that goes on running (waiting for readiness,
following logs) freezes the start-up heap and resumes collection, so its own garbage is freed.
"""

from __future__ import annotations

import gc


def pause() -> None:
    gc.disable()


def resume_for_a_long_run() -> None:
    """Before a wait or a log stream: only when `pause` was called (never in tests)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def skip_collection_at_exit() -> None:
    gc.freeze()
