"""`run` and `redeploy`: commands that start a service or roll out a new deployment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from dstackctl.cli.following import (
    DEFAULT_TIMEOUT,
    Progress,
    attach,
    parse_timeout,
    print_result,
    report,
    wait_rollout_and_report,
    wait_scaled,
)
from dstackctl.cli.output import service_names, state, warn
from dstackctl.cli.plan_view import dry_run
from dstackctl.cli.validate_files import DEFAULT_CONFIG
from dstackctl.errors import DstackctlError, ExitCode, NoSuchService, UsageError
from dstackctl.wording import count_of, replicas_of

if TYPE_CHECKING:
    from dstackctl.config.loader import LoadedConfig
    from dstackctl.deploy import Release


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
    yes: bool = typer.Option(False, "-y", "--yes", help="Update a running service without asking."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object (implies -d)."),
) -> int:
    """Start a service: its replicas as containers behind one endpoint, kept by a background agent.

    The same as `apply`. Without a file, reads .dstack.yml in the current folder.
    Attached by default: shows progress, then the replicas' logs until Ctrl-C (which detaches;
    the service keeps running). A service of that name running another config is updated
    only after you confirm (or with -y): a rolling update, as with `redeploy -f`; without a
    terminal and without -y it exits 2. Exit codes: 0 ready (or already running), 1 a
    replica failed or a rollout was rolled back, 2 invalid configuration or an update not
    confirmed, 3 not ready within --timeout.
    """
    options = _Options(detach or as_json, no_wait, timeout, dry_run, env, port, yes, False, as_json)
    return _run_command(config_file(config_arg, config_opt), name, options)


def apply(
    config_arg: Path | None = typer.Argument(
        None, metavar="CONFIG", help="Service file (or use -f).", show_default=False
    ),
    config_opt: Path | None = typer.Option(None, "-f", "--file", help="Service file (default: .dstack.yml)."),
    name: str | None = typer.Option(None, "-n", "--name", help="Run name (default: the config's name)."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Update a running service without asking."),
    force: bool = typer.Option(
        False, "--force", help="Redeploy even when nothing changed (every replica is replaced)."
    ),
    detach: bool = typer.Option(
        False, "-d", "--detach", help="Return once every replica is running and ready."
    ),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return as soon as the service is submitted."),
    timeout: str = typer.Option(
        DEFAULT_TIMEOUT, "--timeout", help="How long to wait for readiness (e.g. 90s, 10m); exit 3 after."
    ),
    env: list[str] = typer.Option(
        [], "-e", "--env", metavar="KEY[=VAL]", help="Set an env variable (KEY alone: from your environment)."
    ),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port of the service endpoint on 127.0.0.1."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object (implies -d)."),
) -> int:
    """Apply a service file, as `dstack apply` does: start it, or update the running service.

    Without a file, reads .dstack.yml in the current folder. An update shows what changes
    and asks; -y goes ahead; without a terminal and without -y it exits 2. --force redeploys
    an unchanged service. Attached by default (Ctrl-C detaches); -d returns once ready.
    Exit codes as `run`.
    """
    options = _Options(detach or as_json, no_wait, timeout, False, env, port, yes, force, as_json)
    return _run_command(config_file(config_arg, config_opt), name, options)


@dataclass(frozen=True)
class _Options:
    detach: bool
    no_wait: bool
    timeout: str
    dry_run: bool
    env: list[str]
    port: int | None
    yes: bool
    force: bool
    as_json: bool = False


def config_file(argument: Path | None, option: Path | None) -> Path:
    """The file given as CONFIG or -f, else .dstack.yml in the current folder (as dstack)."""
    if argument and option:
        raise UsageError("give the config file once: either CONFIG or -f CONFIG")
    path = argument or option
    if path is not None:
        return path
    if Path(DEFAULT_CONFIG).is_file():
        return Path(DEFAULT_CONFIG)
    raise UsageError(f"which service? give its file with -f FILE, or run this where a {DEFAULT_CONFIG} is")


def _run_command(path: Path, name: str | None, options: _Options) -> int:
    state.as_json = options.as_json
    if options.detach and options.no_wait and not options.as_json:
        raise UsageError("-d waits until ready and --no-wait does not wait: choose one")
    from dstackctl.deploy import run_name

    seconds = parse_timeout(options.timeout)
    if options.dry_run:
        return dry_run(path, name, options.env, options.port)
    loaded, env_values = _load(path, options.env)
    service = run_name(loaded, name)
    return _start(loaded, service, env_values, seconds, options)


def _load(path: Path, env: list[str]) -> tuple[LoadedConfig, dict[str, str]]:
    """The validated file (its warnings printed) and its env values with the -e overrides."""
    from dstackctl.config.loader import load_service_file
    from dstackctl.deploy import parse_env_overrides

    loaded = load_service_file(path)
    for issue in loaded.warnings:
        warn(str(issue))
    overrides = parse_env_overrides(env, os.environ)
    return loaded, {**loaded.resolve_env({**os.environ, **overrides}), **overrides}


def _start(
    loaded: LoadedConfig, service: str, env_values: dict[str, str], seconds: int, options: _Options
) -> int:
    from dstackctl.agent import warm_start
    from dstackctl.deploy import gpu_plan, submit, wants_gpus
    from dstackctl.docker_ping import ping_local_engine
    from dstackctl.endpoint_port import endpoint_port
    from dstackctl.store import Store

    engine = None  # docker-py is not loaded for a local engine when no GPU is wanted
    if not ping_local_engine() or wants_gpus(loaded):
        from dstackctl.docker import DockerEngine

        engine = DockerEngine.connect()
    store = Store()
    port, detach, no_wait = options.port, options.detach, options.no_wait
    spec = store.read(service, "spec") if store.exists(service) else None
    if spec is None or spec.get("desired") != "running":
        gpu_plan(loaded, engine)  # fail before starting anything when the GPUs are not there
    else:
        confirmed = _confirm_changes(store, loaded, service, env_values, options.yes)
        _move_endpoint(store, service, endpoint_port(loaded, port))
        if not confirmed and options.force:
            warm_start.release()
            return _restart(store, loaded, service, env_values, seconds, no_wait)
    try:
        submitted = submit(store, loaded, service, env_values, port, seconds)
    finally:
        warm_start.release()  # the agent was started by now, or none was needed
    if submitted.agent_restarted:
        warn(f"the agent of {service} was not running; restarted it")
    if submitted.outcome == "rollout":
        typer.echo(f"{service}: rolling update to deployment {submitted.deployment_num}.", err=True)
        if no_wait:
            return _submitted(store, service, "rollout")
        return wait_rollout_and_report(
            store, service, seconds, submitted.deployment_num, loaded.config.total_replicas
        )
    if submitted.outcome == "unchanged":
        typer.echo(f"{service} is already running with this configuration.", err=state.as_json)
        if not detach:
            return ExitCode.OK
    elif submitted.outcome == "scaled":
        typer.echo(f"{service}: scaling to {replicas_of(*loaded.config.replica_span)} in place.", err=True)
    if no_wait:
        typer.echo(f"Submitted {service}; `dstackctl ps -v {service}` shows its progress.", err=state.as_json)
        return _submitted(store, service, submitted.outcome)
    code = _wait_until_ready(store, service, seconds, submitted.outcome)
    if code is not None or detach or submitted.outcome != "started":
        return code or ExitCode.OK
    return attach(store, service)


def _confirm_changes(
    store: Any, loaded: LoadedConfig, service: str, env_values: dict[str, str], yes: bool
) -> bool:
    """False when the running service already has this config; else ask (see changes.py)."""
    from dstackctl.cli.changes import config_changes, confirm_update
    from dstackctl.deploy import Release, serving
    from dstackctl.spec_document import SpecDocument

    release = Release.of(loaded, env_values)
    now = serving(store, service, SpecDocument.from_json(store.read(service, "spec") or {})).record
    if (release.config_hash, release.group_counts) == (now.config_hash, now.group_counts):
        return False
    same_file = release.config_hash != now.config_hash and release.config == now.config
    changes = config_changes(now.config, release.config, now.group_counts, release.group_counts, same_file)
    confirm_update(service, changes, yes)
    return True


def _restart(
    store: Any, loaded: LoadedConfig, service: str, env_values: dict[str, str], seconds: int, no_wait: bool
) -> int:
    """`apply --force` of an unchanged config: every replica is replaced, as `redeploy`."""
    from dstackctl.deploy import Release, start_rollout

    number = start_rollout(store, service, Release.of(loaded, env_values), seconds)
    typer.echo(f"{service}: rolling update to deployment {number}.", err=True)
    if no_wait:
        return _submitted(store, service, "rollout")
    return wait_rollout_and_report(store, service, seconds, number, loaded.config.total_replicas)


def _submitted(store: Any, service: str, action: str) -> int:
    """`--no-wait --json`: the service as submitted."""
    if state.as_json:
        from dstackctl.runs import view

        print_result(view(store, service), action, ExitCode.OK, f"submitted {service}")
    return ExitCode.OK


def _wait_until_ready(store: Any, service: str, seconds: int, action: str) -> int | None:
    """None once ready (reported); the exit code when interrupted. A failure raises."""
    from dstackctl.waiting import wait_ready

    try:
        outcome = wait_ready(store, service, seconds, Progress().show)
    except KeyboardInterrupt:
        typer.echo(
            f"Interrupted; {service} keeps starting in the background "
            f"(`dstackctl ps -v {service}`, `dstackctl stop {service}`).",
            err=True,
        )
        return ExitCode.INTERRUPTED
    report(outcome, action)
    return None


def _move_endpoint(store: Any, name: str, port: int) -> None:
    from dstackctl.endpoint_port import move_endpoint

    old = move_endpoint(store, name, port)
    if old is not None:
        typer.echo(f"{name}: moving the endpoint from port {old} to {port}.", err=True)


def redeploy(
    name: str = typer.Argument(..., help="Service name.", autocompletion=service_names),
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
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> int:
    """Replace a service's replicas one by one; each new one takes traffic only once ready.

    With -f the new config is rolled out (a change of `replicas` alone scales in place);
    without it every replica is restarted with the same config, and -e changes the values
    it runs with. An -e value lasts until the next deployment from a file (`run`, `apply`,
    `redeploy -f`), which takes the file's values and that command's -e. When a new replica exits or
    is not ready within --timeout, the rollout is rolled back and the command exits 1.
    """
    from dstackctl.deploy import current_release, start_rollout
    from dstackctl.spec_document import SpecDocument
    from dstackctl.store import Store

    state.as_json = as_json
    seconds = parse_timeout(timeout)
    store = Store()
    data = store.read(name, "spec")
    if data is None:
        raise NoSuchService(name)
    spec = SpecDocument.from_json(data)
    if not spec.running:
        raise DstackctlError(f"{name} is stopped; start it with `dstackctl run -f FILE`")
    if config is None:
        from dstackctl.deploy import parse_env_overrides

        release = current_release(store, name, parse_env_overrides(env, os.environ))
        number = start_rollout(store, name, release, seconds)
    else:
        release, started = _roll_out_file(store, name, data, config, env, seconds)
        if started is None:
            typer.echo(f"{name}: scaling to {count_of(release.replicas, 'replica')} in place.", err=True)
            return _submitted(store, name, "scaled") if no_wait else wait_scaled(store, name, seconds)
        number = started
    typer.echo(f"{name}: rolling update to deployment {number}.", err=True)
    if no_wait:
        return _submitted(store, name, "rollout")
    return wait_rollout_and_report(store, name, seconds, number, release.replicas)


def _roll_out_file(
    store: Any, name: str, data: dict[str, Any], config: Path, env: list[str], seconds: int
) -> tuple[Release, int | None]:
    """Start the rollout of a new file; the deployment is None when only `replicas` changed,
    which scales in place."""
    from dstackctl.deploy import Release, serving, start_rollout, submit
    from dstackctl.endpoint_port import endpoint_port
    from dstackctl.spec_document import SpecDocument

    loaded, env_values = _load(config, env)
    release = Release.of(loaded, env_values)
    _move_endpoint(store, name, endpoint_port(loaded, None))
    now = serving(store, name, SpecDocument.from_json(data)).record
    if release.config_hash == now.config_hash and release.replicas != now.replicas:
        submit(store, loaded, name, env_values, None, seconds)
        return release, None
    return release, start_rollout(store, name, release, seconds)  # same config: a restart


def register(app: typer.Typer) -> None:
    app.command()(apply)
    app.command()(run)
    app.command()(redeploy)
