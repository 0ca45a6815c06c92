"""Process-wide output settings and small rendering helpers shared by commands."""

from __future__ import annotations

from dataclasses import dataclass

import typer


@dataclass
class _State:
    debug: bool = False
    as_json: bool = False  # run/apply/redeploy/stop --json: one object on stdout, words on stderr


state = _State()


def warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def service_names(incomplete: str) -> list[str]:
    """Shell completion of a NAME argument: the services in the store."""
    from dstackctl.store import Store

    try:
        return [name for name in Store().names() if name.startswith(incomplete)]
    except Exception:  # completion must never print an error into the shell
        return []
