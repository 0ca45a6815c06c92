"""`run`, `ps`, `stop` and `logs`: commands that act on services."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from dstackctl.cli.output import warn
from dstackctl.errors import DstackctlError, ExitCode, UsageError

if TYPE_CHECKING:
    from dstackctl.runs import RunView

DEFAULT_TIMEOUT = "10m"


def _parse_timeout(text: str) -> int:
    from dstackctl.config.units import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from None
    if seconds <= 0:
        raise UsageError("--timeout must be at least 1s")
    return seconds


def run(
    config_arg: Path | None = typer.Argument(
        None, metavar="CONFIG", help="Service file (or use -f).", show_default=False
    ),
    config_opt: Path | None = typer.Option(None, "-f", "--file", help="Service file."),
    name: str | None = typer.Option(None, "-n", "--name", help="Run name (default: the config's name)."),
    detach: bool = typer.Option(
        False, "-d", "--detach", help="Return once every replica is running and ready."
    ),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return as soon as the service is submitted."),
    timeout: str = typer.Option(
        DEFAULT_TIMEOUT, "--timeout", help="How long to wait for readiness (e.g. 90s, 10m); exit 3 after."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and touch nothing."),
    env: list[str] = typer.Option(
        [], "-e", "--env", metavar="KEY[=VAL]", help="Set an env variable (KEY alone: from your environment)."
    ),
    yes: bool = typer.Option(
        False, "-y", "--yes", help="Do not ask for confirmation (dstack compatibility)."
    ),
) -> int:
    """Start a service: its replicas as containers, kept by a background agent.

    Attached by default: shows progress, then the replicas' logs until Ctrl-C (which detaches;
    the service keeps running). Exit codes: 0 ready (or already running), 1 a replica failed,
    2 invalid configuration or name in use, 3 not ready within --timeout.
    """
    from dstackctl.config.loader import load_service_file
    from dstackctl.services import parse_env_overrides, run_name, submit, wait_ready
    from dstackctl.store import Store

    if config_arg and config_opt:
        raise UsageError("give the config file once: either CONFIG or -f CONFIG")
    path = config_arg or config_opt
    if path is None:
        raise UsageError("which service? give its file: dstackctl run -f FILE")
    if detach and no_wait:
        raise UsageError("-d waits until ready and --no-wait does not wait: choose one")
    seconds = _parse_timeout(timeout)
    loaded = load_service_file(path)
    for issue in loaded.warnings:
        warn(str(issue))
    overrides = parse_env_overrides(env, os.environ)
    env_values = {**loaded.resolve_env({**os.environ, **overrides}), **overrides}
    service = run_name(loaded, name)
    if dry_run:
        typer.echo(_plan(loaded, service, env_values))
        return ExitCode.OK
    from dstackctl.docker import DockerEngine

    engine = DockerEngine.connect()
    store = Store()
    submitted = submit(store, loaded, service, env_values, engine)
    if submitted.already_running:
        typer.echo(f"{service} is already running with this configuration.")
        if submitted.agent_restarted:
            warn(f"the agent of {service} was not running; restarted it")
        if not detach:
            return ExitCode.OK
    elif no_wait:
        typer.echo(f"Submitted {service}; `dstackctl ps -v {service}` shows its progress.")
        return ExitCode.OK
    progress = _Progress()
    try:
        outcome = wait_ready(store, service, seconds, progress.show)
    except KeyboardInterrupt:
        typer.echo(
            f"Interrupted; {service} keeps starting in the background "
            f"(`dstackctl ps -v {service}`, `dstackctl stop {service}`).",
            err=True,
        )
        return ExitCode.INTERRUPTED
    if outcome.exit_code != ExitCode.OK:
        raise DstackctlError(outcome.message, outcome.exit_code)
    typer.echo(outcome.message + _urls(outcome.view))
    if detach or submitted.already_running:
        return ExitCode.OK
    return _attach(store, service, engine)


def _urls(view: RunView | None) -> str:
    if view is None:
        return ""
    if view.url:
        return f": {view.url}"
    urls = [r["url"] for r in view.replicas if r.get("url")]
    return f": {', '.join(urls)}" if urls else ""


class _Progress:
    """Prints a line whenever a replica's status or message changes (to stderr)."""

    def __init__(self) -> None:
        self._last: dict[int, str] = {}

    def show(self, view: RunView) -> None:
        from dstackctl.services import describe_replica

        for replica in view.replicas:
            text = describe_replica(replica)
            if replica.get("ready"):
                text = f"replica={replica['replica_num']} ready on {replica.get('url')}"
            num = replica["replica_num"]
            if self._last.get(num) == text:
                continue
            self._last[num] = text
            typer.echo(text, err=True)


def _attach(store: Any, service: str, engine: Any) -> int:
    from dstackctl.services import iter_logs, log_sources

    typer.echo(f"Showing the logs of {service}; Ctrl-C detaches (the service keeps running).", err=True)
    try:
        sources = log_sources(store, service, engine, None)
        _print_logs(iter_logs(engine, sources, tail=None, follow=True), prefix=len(sources) > 1)
    except KeyboardInterrupt:
        typer.echo(f"\nDetached. {service} keeps running; stop it with `dstackctl stop {service}`.", err=True)
        return ExitCode.OK
    typer.echo(f"The replicas of {service} stopped; `dstackctl ps -v {service}` shows why.", err=True)
    return ExitCode.FAILED


def _print_logs(lines: Any, prefix: bool) -> None:
    out = sys.stdout.buffer
    for num, line in lines:
        if prefix:
            out.write(f"replica={num} | ".encode())
        out.write(line)
        out.flush()


def _plan(loaded: Any, service: str, env_values: dict[str, str]) -> str:
    from dstackctl.replica_spec import entrypoint_and_command, image_of

    config = loaded.config
    entrypoint, command = entrypoint_and_command(config)
    gpu = config.resources.gpu
    local_port = config.port.local_port or config.port.container_port
    probes = ", ".join(f"{p.method.upper()} {p.url}" for p in config.effective_probes())
    lines = [
        f"Plan for {service} (nothing was started):",
        f"  image:     {image_of(config)}",
        f"  replicas:  {config.replicas}, each publishing container port "
        f"{config.port.container_port} on 127.0.0.1 (ephemeral host port)",
        f"  endpoint:  http://127.0.0.1:{local_port}",
        f"  command:   {' '.join(entrypoint or [])} {' '.join(command or [])}".rstrip(),
        f"  env:       {', '.join(sorted(env_values)) or '(none)'}",
        f"  gpu:       {gpu if gpu and gpu.wants_gpus else 'none'}",
        f"  probes:    {probes or 'none'}",
    ]
    return "\n".join(lines)


def ps(
    name: str | None = typer.Argument(None, help="Show only this service."),
    all_runs: bool = typer.Option(False, "-a", "--all", help="Include stopped services."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="A row per replica, with probes."),
    wide: bool = typer.Option(False, "-w", "--wide", help="Do not shorten columns; add container ids."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (versioned envelope)."),
) -> int:
    """List services and their replicas. Exit 0 whenever the store could be read."""
    from dstackctl.cli.render import runs_json, runs_table
    from dstackctl.runs import all_views, view
    from dstackctl.store import Store

    store = Store()
    if name is not None:
        found = view(store, name)
        if found is None:
            raise DstackctlError(f"no service named {name}; `dstackctl ps -a` lists them")
        views = [found]
    else:
        views = all_views(store, include_stopped=all_runs)
    for run_view in views:
        if run_view.active and not run_view.agent_alive:
            warn(f"the agent of {run_view.name} is not running; `dstackctl run` of its file restarts it")
        if run_view.engine_problem:
            warn(f"{run_view.name}: {run_view.engine_problem}")
    typer.echo(runs_json(views) if as_json else runs_table(views, verbose, wide))
    return ExitCode.OK


def stop(
    names: list[str] = typer.Argument(None, metavar="NAME...", help="Services to stop.", show_default=False),
    all_services: bool = typer.Option(False, "--all", help="Stop every running service."),
) -> int:
    """Stop services: their agent and containers (SIGTERM, then SIGKILL after the grace period).

    The record stays for `ps -a`.
    """
    from concurrent.futures import ThreadPoolExecutor

    from dstackctl.docker import DockerEngine
    from dstackctl.runs import all_views
    from dstackctl.services import stop_service
    from dstackctl.store import Store

    if all_services and names:
        raise UsageError("give service names or --all, not both")
    store = Store()
    if all_services:
        names = [v.name for v in all_views(store, include_stopped=False)]
        if not names:
            typer.echo("No running services.")
            return ExitCode.OK
    if not names:
        raise UsageError("which service? give its name (`dstackctl ps` lists them) or --all")
    engine = DockerEngine.connect()

    def one(service: str) -> tuple[str, str | None]:
        try:
            removed = stop_service(store, service, engine)
        except DstackctlError as exc:
            return service, exc.message
        return service, f"{removed} container{'s' if removed != 1 else ''} removed"

    failed = False
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        for service, result in pool.map(one, names):
            if result and result.endswith("removed"):
                typer.echo(f"Stopped {service} ({result}).")
            else:
                failed = True
                typer.echo(f"error: {result}", err=True)
    return ExitCode.FAILED if failed else ExitCode.OK


def logs(
    name: str = typer.Argument(..., help="Service name."),
    replica: int | None = typer.Option(None, "--replica", help="Only this replica number."),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines."),
    tail: int | None = typer.Option(None, "--tail", help="Only the last N lines of each replica."),
) -> int:
    """Print the logs of a service's replicas (prefixed with `replica=N |` when several)."""
    from dstackctl.docker import DockerEngine
    from dstackctl.services import iter_logs, log_sources
    from dstackctl.store import Store

    if tail is not None and tail < 0:
        raise UsageError("--tail must be 0 or more")
    engine = DockerEngine.connect()
    sources = log_sources(Store(), name, engine, replica)
    _print_logs(iter_logs(engine, sources, tail=tail, follow=follow), prefix=len(sources) > 1)
    return ExitCode.OK


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(ps)
    app.command()(stop)
    app.command()(logs)
