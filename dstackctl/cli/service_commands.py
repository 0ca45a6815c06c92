"""`ps`, `stop`, `logs` and `recover`: commands that look at or end running services."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from dstackctl.cli.following import print_logs
from dstackctl.cli.output import service_names
from dstackctl.errors import DstackctlError, ExitCode, NoSuchService, UsageError
from dstackctl.wording import count_of

if TYPE_CHECKING:
    pass


def ps(
    name: str | None = typer.Argument(None, help="Show only this service.", autocompletion=service_names),
    all_runs: bool = typer.Option(False, "-a", "--all", help="Include stopped services."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="A row per replica, with probes."),
    watch: bool = typer.Option(False, "-w", "--watch", help="Refresh every second until Ctrl-C."),
    last: int | None = typer.Option(
        None, "-n", "--last", min=1, help="Only the N most recently submitted services (stopped too)."
    ),
    wide: bool = typer.Option(False, "--wide", help="Do not shorten columns; add container ids."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (versioned envelope)."),
) -> int:
    """List services and their replicas.

    Exit 0 whenever the store could be read (listing, a stopped service's unreadable state
    is a warning); 1 when NAME is no service or its files cannot be read, or a running
    service's files cannot be read."""
    from functools import partial

    from dstackctl.cli.ps_view import show_runs, watch_runs

    show = partial(show_runs, name, all_runs, verbose, wide, as_json, last)
    return watch_runs(show) if watch else show()


def stop(
    names: list[str] = typer.Argument(
        None, metavar="NAME...", help="Services to stop.", show_default=False, autocompletion=service_names
    ),
    all_services: bool = typer.Option(False, "--all", help="Stop every running service."),
    abort: bool = typer.Option(
        False, "-x", "--abort", help="Kill the containers at once, without the grace period."
    ),
    yes: bool = typer.Option(False, "-y", "--yes", help="Accepted for dstack's scripts; stop never asks."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> int:
    """Stop services: their agent and containers (SIGTERM, then SIGKILL after the grace period).

    The record stays for `ps -a`.
    """
    from concurrent.futures import ThreadPoolExecutor

    from dstackctl.docker import DockerEngine
    from dstackctl.lifecycle import stop_service
    from dstackctl.runs import running_names
    from dstackctl.store import Store

    if all_services and names:
        raise UsageError("give service names or --all, not both")
    store = Store()
    if all_services:
        names = running_names(store)
        if not names:
            typer.echo("No running services.")
            return ExitCode.OK
    if not names:
        raise UsageError("which service? give its name (`dstackctl ps` lists them) or --all")
    unknown = [service for service in names if not store.exists(service)]
    if len(unknown) == len(names):  # nothing to stop: say so without needing Docker
        for service in unknown:
            typer.echo(f"error: {NoSuchService(service).message}", err=True)
        return ExitCode.FAILED
    engine = DockerEngine.connect()

    def one(service: str) -> tuple[str, str | None]:
        try:
            removed = stop_service(store, service, engine, abort=abort)
        except DstackctlError as exc:
            return service, exc.message
        return service, f"{count_of(removed, 'container')} removed"

    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        return _report_stops(list(pool.map(one, names)), as_json)


def _report_stops(results: list[tuple[str, str | None]], as_json: bool) -> int:
    failed = False
    documents = []
    for service, result in results:
        stopped = bool(result and result.endswith("removed"))
        documents.append({"name": service, "outcome": "stopped" if stopped else "failed", "message": result})
        if stopped:
            typer.echo(f"Stopped {service} ({result}).", err=as_json)
        else:
            failed = True
            typer.echo(f"error: {result}", err=True)
    if as_json:
        import json

        typer.echo(json.dumps({"services": documents}))
    return ExitCode.FAILED if failed else ExitCode.OK


def logs(
    name: str = typer.Argument(..., help="Service name.", autocompletion=service_names),
    replica: int | None = typer.Option(None, "--replica", help="Only this replica number."),
    group: str | None = typer.Option(None, "--group", help="Only this replica group."),
    follow: bool = typer.Option(
        False, "-f", "--follow", help="Follow the service: new replicas join, until it stops."
    ),
    tail: int | None = typer.Option(None, "--tail", help="Only the last N lines of each replica."),
    since: str | None = typer.Option(
        None,
        "--since",
        help="Only lines from this long ago (10m, 2h) or since a time (2026-12-03T10:00:00Z).",
    ),
) -> int:
    """Print the logs of a service's replicas, also of replaced ones and after `stop` (the
    agent keeps each replica's output, secrets masked: 2 x 5 MiB per container, the newest
    64 containers). Lines are prefixed with `replica=N |` when there are several sources."""
    from dstackctl.replica_logs import Filter, follow_service, iter_logs, log_sources, secret_values
    from dstackctl.store import Store

    if tail is not None and tail < 0:
        raise UsageError("--tail must be 0 or more")
    only = Filter(replica, group, _since(since) if since else None)
    store = Store()
    if not store.exists(name):  # say so without needing Docker
        raise NoSuchService(name)
    if follow:
        if not _running(store, name):
            log_sources(store, name, None, only)  # a stopped service without output: say so
        print_logs(follow_service(store, name, only, tail), prefix=True)
        return ExitCode.OK
    engine = _engine_for(store, name)
    sources = log_sources(store, name, engine, only)
    lines = iter_logs(engine, sources, tail, only.since, secret_values(store, name))
    print_logs(lines, prefix=len(sources) > 1)
    return ExitCode.OK


def _running(store: Any, name: str) -> bool:
    return bool((store.read(name, "spec") or {}).get("desired") == "running")


def _engine_for(store: Any, name: str) -> Any:
    """Docker for a running service (its containers' logs are Docker's); a stopped one's kept
    logs are read without it."""
    from dstackctl.docker import DockerEngine

    try:
        return DockerEngine.connect()
    except DstackctlError:
        if _running(store, name):
            raise
        return None


def _since(text: str) -> float:
    import time
    from datetime import datetime

    from dstackctl.config.units import parse_duration

    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise UsageError(
            f"--since: expected a duration such as 10m or a time such as 2026-12-03T10:00:00Z, got {text!r}"
        ) from None


def recover(name: str = typer.Argument(..., help="Service name.", autocompletion=service_names)) -> int:
    """Rebuild a service's lost or corrupt record from its containers' labels, restart its agent."""
    from dstackctl.docker import DockerEngine
    from dstackctl.lifecycle import recover_service
    from dstackctl.store import Store

    container, deployment = recover_service(Store(), name, DockerEngine.connect())
    typer.echo(
        f"Rebuilt the record of {name} from container {container} (deployment {deployment}); "
        f"its agent runs again (`dstackctl ps -v {name}`)."
    )
    return ExitCode.OK


def register(app: typer.Typer) -> None:
    app.command()(ps)
    app.command()(stop)
    app.command()(logs)
    app.command()(recover)
