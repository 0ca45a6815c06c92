"""The console script. `ps`, `validate` and plain `run`/`apply` take fast paths without typer
(~50-80 ms of imports): scripts and editors run the first two often, and the last two wait for
nothing else before starting the agent. Everything else goes through the Typer app."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import partial

from dstackctl.cli import failures, gc_policy

FastPath = Callable[[list[str]], "int | None"]


def _fast_path(command: str) -> FastPath | None:
    if command in ("run", "apply"):
        from dstackctl.cli.run_flow import fast_run

        return partial(fast_run, command)
    if command == "ps":
        from dstackctl.cli.ps_view import fast_ps

        return fast_ps
    if command == "validate":
        from dstackctl.cli.validate_files import fast_validate

        return fast_validate
    return None


def run_fast_path(argv: list[str]) -> int | None:
    """The exit code of `argv` (command first) when a fast path handled it, with errors
    reported as the Typer app reports them; None when the Typer app must handle it."""
    handler = _fast_path(argv[0]) if argv else None
    if handler is None:
        return None
    try:
        return handler(argv[1:])
    except (Exception, KeyboardInterrupt) as exc:
        return failures.report(exc)


def _only_help(args: list[str]) -> bool:
    """Help and version start no agent: they need not prepare the agents' fork server."""
    return not args or any(arg in ("-h", "--help", "--version") for arg in args)


def _may_start_an_agent(args: list[str]) -> bool:
    """`run` and `apply` of a new service start its agent: worth a warm supervisor."""
    return args[0] in ("run", "apply") and "--dry-run" not in args and not _only_help(args)


def main() -> None:
    gc_policy.pause()
    # dstackctl's config models use no pydantic plugins; looking for them reads the metadata
    # of every installed package (~15 ms on each command).
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")
    args = sys.argv[1:]
    if args and _may_start_an_agent(args):
        from dstackctl.agent import warm_start

        warm_start.prepare()  # before anything is imported or opened: see agent/warm_start.py
        from dstackctl.agent.process import fork_agents

        fork_agents()  # should the warm supervisor be gone, start_agent forks the next best way
    try:
        code = run_fast_path(args)
        if code is not None:
            sys.exit(code)
        from dstackctl.cli.main import main as typer_main

        if not _only_help(args):
            from dstackctl.agent.process import fork_agents

            fork_agents()  # this process is the CLI alone: no other threads, no embedding program
        typer_main(args)
    finally:
        gc_policy.skip_collection_at_exit()
