"""The console script: `ps` takes a fast path; everything else goes through the Typer app."""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["ps"]:
        from dstackctl.cli.ps_view import fast_ps

        code = fast_ps(args[1:])
        if code is not None:
            sys.exit(code)
    from dstackctl.cli.main import main as typer_main
    from dstackctl.runs import fork_agents

    fork_agents()  # this process is the CLI alone: no other threads, no embedding program
    typer_main(args)
