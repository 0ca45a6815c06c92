"""`ps`: list services from the store. Kept free of typer so the fast path can use it."""

from __future__ import annotations

import sys

from dstackctl.errors import ExitCode, NoSuchService


def _err(message: str) -> None:
    sys.stderr.write(message + "\n")


def show_runs(name: str | None, all_runs: bool, verbose: bool, wide: bool, as_json: bool) -> int:
    from dstackctl.cli.render import runs_json, runs_table
    from dstackctl.runs import all_views, view
    from dstackctl.store import Store

    unreadable: list[str] = []
    store = Store()
    if name is not None:
        found = view(store, name)
        if found is None:
            raise NoSuchService(name)
        views = [found]
    else:
        views = all_views(store, include_stopped=all_runs, problems=unreadable)
    for problem in unreadable:
        _err(f"error: {problem}")
    for run_view in views:
        if run_view.active and not run_view.agent_alive:
            _err(
                f"warning: the agent of {run_view.name} is not running, so its endpoint is down; "
                f"`dstackctl run` of its file or `dstackctl redeploy {run_view.name}` restarts it"
            )
        if run_view.engine_problem:
            _err(f"warning: {run_view.name}: {run_view.engine_problem}")
    sys.stdout.write((runs_json(views) if as_json else runs_table(views, verbose, wide)) + "\n")
    return ExitCode.FAILED if unreadable else ExitCode.OK


def fast_ps(args: list[str]) -> int | None:
    """`ps` without loading typer (it is the command scripts poll). None: let typer handle it
    (help, or anything this small parser does not accept, so typer reports it)."""
    import argparse

    if any(arg in ("-h", "--help") for arg in args):
        return None
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("name", nargs="?")
    parser.add_argument("-a", "--all", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-w", "--wide", action="store_true")
    parser.add_argument("--json", action="store_true")
    try:
        parsed, unknown = parser.parse_known_args(args)
    except (argparse.ArgumentError, SystemExit):
        return None
    if unknown or (parsed.name or "").startswith("-"):
        return None
    return show_runs(parsed.name, parsed.all, parsed.verbose, parsed.wide, parsed.json)
