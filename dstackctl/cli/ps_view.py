"""`ps`: list services from the store. Kept free of typer so the fast path can use it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial

from dstackctl.errors import ExitCode, NoSuchService


def _err(message: str) -> None:
    sys.stderr.write(message + "\n")


WATCH_SECONDS = 1.0


def watch_runs(show: Callable[[], int], interval: float = WATCH_SECONDS) -> int:
    """`ps --watch`: the table again every `interval` until Ctrl-C; redrawn in place on a
    terminal, one table after another (blank line between) when not."""
    tty = sys.stdout.isatty()
    first = True
    try:
        while True:
            if tty:
                sys.stdout.write("\033[H\033[2J")
            elif not first:
                sys.stdout.write("\n")
            first = False
            show()
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return ExitCode.OK


def show_runs(
    name: str | None, all_runs: bool, verbose: bool, wide: bool, as_json: bool, last: int | None = None
) -> int:
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
        views = all_views(store, include_stopped=all_runs or last is not None, problems=unreadable)
        if last is not None:  # dstack's `ps -n N`: the N most recently submitted
            views = sorted(views, key=lambda v: v.submitted_at or "", reverse=True)[:last]
    for problem in unreadable:
        _err(f"error: {problem}")
    for run_view in views:
        for message in run_view.warnings:
            _err(f"warning: {message}")
        if run_view.active and not run_view.agent_alive:
            _err(
                f"warning: the agent of {run_view.name} is not running, so its endpoint is down; "
                f"`dstackctl run` of its file or `dstackctl redeploy {run_view.name}` restarts it"
            )
        age = run_view.stale_for
        if age is not None:
            _err(
                f"warning: the state of {run_view.name} is {int(age)}s old: its agent has not written "
                f"it since (stopped, overloaded, or a full disk or read-only folder); what ps shows may "
                f"be out of date; see {store.log_path(run_view.name)}"
            )
        if run_view.engine_problem:
            _err(f"warning: {run_view.name}: {run_view.engine_problem}")
    text = runs_json(views) if as_json else _fit(runs_table(views, verbose, wide), wide)
    sys.stdout.write(text + "\n")
    return ExitCode.FAILED if unreadable else ExitCode.OK


def _fit(table: str, wide: bool) -> str:
    """On a terminal, each line is cut to its width (the MESSAGE column goes first); --wide
    and output that is not a terminal keep everything."""
    if wide or not sys.stdout.isatty():
        return table
    import shutil

    width = shutil.get_terminal_size((80, 24)).columns
    return "\n".join(line if len(line) <= width else line[: width - 1] + "…" for line in table.split("\n"))


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
    parser.add_argument("--wide", action="store_true")
    parser.add_argument("-w", "--watch", action="store_true")
    parser.add_argument("-n", "--last", type=int)
    parser.add_argument("--json", action="store_true")
    try:
        parsed, unknown = parser.parse_known_args(args)
    except (argparse.ArgumentError, SystemExit):
        return None
    if unknown or (parsed.name or "").startswith("-") or (parsed.last is not None and parsed.last < 1):
        return None
    show = partial(show_runs, parsed.name, parsed.all, parsed.verbose, parsed.wide, parsed.json, parsed.last)
    return watch_runs(show) if parsed.watch else show()
