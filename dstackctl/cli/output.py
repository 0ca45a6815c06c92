"""Process-wide output settings and small rendering helpers shared by commands."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class _State:
    debug: bool = False
    as_json: bool = False  # run/apply/redeploy/stop --json: one object on stdout, words on stderr


state = _State()


def echo(message: str, err: bool = False) -> None:
    """One line on stdout (stderr with `err`), flushed: what typer.echo does with text,
    without loading typer (the fast paths of cli/entry.py use this too)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(f"{message}\n")
    stream.flush()


def warn(message: str) -> None:
    echo(f"warning: {message}", err=True)


def service_names(incomplete: str) -> list[str]:
    """Shell completion of a NAME argument: the services in the store."""
    from dstackctl.store import Store

    try:
        return [name for name in Store().names() if name.startswith(incomplete)]
    except Exception:  # completion must never print an error into the shell
        return []
