"""`run`, `ps`, `stop` and `logs`: commands that act on services."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from dstackctl.cli import gc_policy
from dstackctl.cli.output import warn
from dstackctl.errors import DstackctlError, ExitCode, NoSuchService, UsageError

if TYPE_CHECKING:
    from dstackctl.runs import RunView
    from dstackctl.waiting import Outcome

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
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port of the service endpoint on 127.0.0.1."
    ),
) -> int:
    """Start a service: its replicas as containers behind one endpoint, kept by a background agent.

    Attached by default: shows progress, then the replicas' logs until Ctrl-C (which detaches;
    the service keeps running). A running service with a changed config gets a rolling update,
    as with `redeploy -f`. Exit codes: 0 ready (or already running), 1 a replica failed or a
    rollout was rolled back, 2 invalid configuration, 3 not ready within --timeout.
    """
    from dstackctl.config.loader import load_service_file
    from dstackctl.deploy import parse_env_overrides, run_name, submit
    from dstackctl.store import Store
    from dstackctl.waiting import wait_ready

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
    from dstackctl.deploy import endpoint_port, gpu_plan
    from dstackctl.docker import DockerEngine

    if dry_run:
        try:
            engine: DockerEngine | None = DockerEngine.connect()
        except DstackctlError:
            engine = None  # the plan can be made without Docker; GPUs in use are then unknown
        typer.echo(_plan(loaded, service, env_values, port, gpu_plan(loaded, engine)))
        return ExitCode.OK
    engine = DockerEngine.connect()
    store = Store()
    spec = store.read(service, "spec") if store.exists(service) else None
    if spec is None or spec.get("desired") != "running":
        gpu_plan(loaded, engine)  # fail before starting anything when the GPUs are not there
    else:
        _warn_if_port_changes(spec, endpoint_port(loaded, port))
    submitted = submit(store, loaded, service, env_values, port, seconds)
    if submitted.agent_restarted:
        warn(f"the agent of {service} was not running; restarted it")
    if submitted.outcome == "rollout":
        typer.echo(f"{service}: rolling update to deployment {submitted.deployment_num}.", err=True)
        if no_wait:
            return ExitCode.OK
        return _wait_rollout(store, service, seconds, submitted.deployment_num, loaded.config.replicas)
    if submitted.outcome == "unchanged":
        typer.echo(f"{service} is already running with this configuration.")
        if not detach:
            return ExitCode.OK
    elif submitted.outcome == "scaled":
        typer.echo(f"{service}: scaling to {loaded.config.replicas} replicas in place.", err=True)
    if no_wait:
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
    _report(outcome)
    if detach or submitted.outcome != "started":
        return ExitCode.OK
    assert engine is not None
    return _attach(store, service, engine)


def _warn_if_port_changes(spec: dict[str, Any], wanted: int) -> None:
    current = spec.get("endpoint_port")
    if current is not None and current != wanted:
        warn(
            f"the endpoint of {spec.get('name')} keeps port {current}; to move it to {wanted}, "
            f"stop the service and run it again"
        )


def _wait_rollout(store: Any, service: str, seconds: int, deployment_num: int, replicas: int) -> int:
    from dstackctl.deploy import forget_previous_env
    from dstackctl.waiting import wait_rollout

    # Each new replica has `seconds` to get ready; the rollback is bounded the same way.
    overall = seconds * (2 * replicas + 2)
    try:
        outcome = wait_rollout(store, service, deployment_num, overall, _Progress().show)
    except KeyboardInterrupt:
        typer.echo(
            f"Interrupted; the agent carries on with the rollout of {service} (`dstackctl ps -v {service}`).",
            err=True,
        )
        return ExitCode.INTERRUPTED
    if outcome.exit_code == ExitCode.OK:
        forget_previous_env(store, service)
    _report(outcome)
    return ExitCode.OK


def redeploy(
    name: str = typer.Argument(..., help="Service name."),
    config: Path | None = typer.Option(
        None, "-f", "--file", help="New service file (default: restart with the same config)."
    ),
    timeout: str = typer.Option(
        DEFAULT_TIMEOUT, "--timeout", help="Each new replica must be ready within this (e.g. 90s, 10m)."
    ),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return once the rollout has started."),
    env: list[str] = typer.Option(
        [], "-e", "--env", metavar="KEY[=VAL]", help="Set an env variable (KEY alone: from your environment)."
    ),
) -> int:
    """Replace a service's replicas one by one; each new one takes traffic only once ready.

    With -f the new config is rolled out (a change of `replicas` alone scales in place);
    without it every replica is restarted with the same config. When a new replica exits or
    is not ready within --timeout, the rollout is rolled back and the command exits 1.
    """
    from dstackctl.config.loader import load_service_file
    from dstackctl.deploy import (
        Release,
        current_release,
        endpoint_port,
        parse_env_overrides,
        serving,
        start_rollout,
        submit,
    )
    from dstackctl.spec_document import SpecDocument
    from dstackctl.store import Store

    seconds = _parse_timeout(timeout)
    store = Store()
    data = store.read(name, "spec")
    if data is None:
        raise NoSuchService(name)
    spec = SpecDocument.from_json(data)
    if not spec.running:
        raise DstackctlError(f"{name} is stopped; start it with `dstackctl run -f FILE`")
    if config is None:
        if env:
            raise UsageError("-e needs -f: give the config file the new values belong to")
        release = current_release(store, name)
        number = start_rollout(store, name, release, seconds)
    else:
        loaded = load_service_file(config)
        for issue in loaded.warnings:
            warn(str(issue))
        overrides = parse_env_overrides(env, os.environ)
        env_values = {**loaded.resolve_env({**os.environ, **overrides}), **overrides}
        release = Release.of(loaded, env_values)
        _warn_if_port_changes(data, endpoint_port(loaded, None))
        now = serving(store, name, spec).record
        if release.config_hash == now.config_hash:
            if release.replicas == now.replicas:
                number = start_rollout(store, name, release, seconds)  # same config: restart
            else:
                submit(store, loaded, name, env_values, None, seconds)
                typer.echo(f"{name}: scaling to {release.replicas} replicas in place.", err=True)
                return ExitCode.OK if no_wait else _wait_scaled(store, name, seconds)
        else:
            number = start_rollout(store, name, release, seconds)
    typer.echo(f"{name}: rolling update to deployment {number}.", err=True)
    if no_wait:
        return ExitCode.OK
    return _wait_rollout(store, name, seconds, number, release.replicas)


def _wait_scaled(store: Any, service: str, seconds: int) -> int:
    from dstackctl.waiting import wait_ready

    outcome = wait_ready(store, service, seconds, _Progress().show)
    _report(outcome)
    return ExitCode.OK


def _report(outcome: Outcome) -> None:
    """Print a successful wait's outcome with the URLs; raise a failed one (its exit code)."""
    if outcome.exit_code != ExitCode.OK:
        raise DstackctlError(outcome.message, outcome.exit_code)
    typer.echo(outcome.message + _urls(outcome.view))


def _urls(view: RunView | None) -> str:
    if view is None:
        return ""
    if view.url:
        return f": {view.url}"
    urls = [r.url for r in view.replicas if r.url]
    return f": {', '.join(urls)}" if urls else ""


class _Progress:
    """Prints a line whenever a replica's status or message changes (to stderr)."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, int], str] = {}
        gc_policy.resume_for_a_long_run()  # it shows a wait of seconds to minutes

    def show(self, view: RunView) -> None:
        several = len({r.deployment_num for r in view.replicas}) > 1
        for replica in view.replicas:
            key = (replica.replica_num, replica.deployment_num)
            text = replica.describe()
            if replica.ready:
                text = f"replica={key[0]} ready on {replica.url}"
            if several:
                text = text.replace(f"replica={key[0]} ", f"replica={key[0]} deployment={key[1]} ", 1)
            if self._last.get(key) == text:
                continue
            self._last[key] = text
            typer.echo(text, err=True)


def _attach(store: Any, service: str, engine: Any) -> int:
    from dstackctl.replica_logs import iter_logs, log_sources

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
    gc_policy.resume_for_a_long_run()
    out = sys.stdout.buffer
    for num, line in lines:
        if prefix:
            out.write(f"replica={num} | ".encode())
        out.write(line)
        out.flush()


def _plan(
    loaded: Any, service: str, env_values: dict[str, str], port: int | None, gpus: list[list[Any]] | None
) -> str:
    from dstackctl.replica_spec import entrypoint_and_command, image_of

    config = loaded.config
    entrypoint, command = entrypoint_and_command(config)
    gpu = config.resources.gpu
    local_port = port or config.port.local_port or config.port.container_port
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
        *(
            f"    replica={num}: " + ", ".join(f"GPU {g.index} ({g}, {g.uuid})" for g in chosen)
            for num, chosen in enumerate(gpus or [])
        ),
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
    from dstackctl.cli.ps_view import show_runs

    return show_runs(name, all_runs, verbose, wide, as_json)


def stop(
    names: list[str] = typer.Argument(None, metavar="NAME...", help="Services to stop.", show_default=False),
    all_services: bool = typer.Option(False, "--all", help="Stop every running service."),
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
    from dstackctl.replica_logs import iter_logs, log_sources
    from dstackctl.store import Store

    if tail is not None and tail < 0:
        raise UsageError("--tail must be 0 or more")
    store = Store()
    if not store.exists(name):  # say so without needing Docker
        raise NoSuchService(name)
    engine = DockerEngine.connect()
    sources = log_sources(store, name, engine, replica)
    _print_logs(iter_logs(engine, sources, tail=tail, follow=follow), prefix=len(sources) > 1)
    return ExitCode.OK


def recover(name: str = typer.Argument(..., help="Service name.")) -> int:
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
    app.command()(run)
    app.command()(redeploy)
    app.command()(ps)
    app.command()(stop)
    app.command()(logs)
    app.command()(recover)
