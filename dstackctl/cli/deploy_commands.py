"""`run` and `redeploy`: commands that start a service or roll out a new deployment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from dstackctl.cli.following import parse_timeout, wait_rollout_and_report, wait_scaled
from dstackctl.cli.output import echo, service_names, state
from dstackctl.cli.run_flow import (
    DEFAULT_TIMEOUT,
    Options,
    config_file,
    load,
    move_endpoint,
    print_submitted,
    run_command,
)
from dstackctl.errors import DstackctlError, NoSuchService
from dstackctl.wording import count_of

if TYPE_CHECKING:
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
    options = Options(detach or as_json, no_wait, timeout, dry_run, env, port, yes, False, as_json)
    return run_command(config_file(config_arg, config_opt), name, options)


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
    options = Options(detach or as_json, no_wait, timeout, False, env, port, yes, force, as_json)
    return run_command(config_file(config_arg, config_opt), name, options)


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
            echo(f"{name}: scaling to {count_of(release.replicas, 'replica')} in place.", err=True)
            return print_submitted(store, name, "scaled") if no_wait else wait_scaled(store, name, seconds)
        number = started
    echo(f"{name}: rolling update to deployment {number}.", err=True)
    if no_wait:
        return print_submitted(store, name, "rollout")
    return wait_rollout_and_report(store, name, seconds, number, release.replicas)


def _roll_out_file(
    store: Any, name: str, data: dict[str, Any], config: Path, env: list[str], seconds: int
) -> tuple[Release, int | None]:
    """Start the rollout of a new file; the deployment is None when only `replicas` changed,
    which scales in place."""
    from dstackctl.deploy import Release, serving, start_rollout, submit
    from dstackctl.endpoint_port import endpoint_port
    from dstackctl.spec_document import SpecDocument

    loaded, env_values = load(config, env)
    release = Release.of(loaded, env_values)
    move_endpoint(store, name, endpoint_port(loaded, None))
    now = serving(store, name, SpecDocument.from_json(data)).record
    if release.config_hash == now.config_hash and release.replicas != now.replicas:
        submit(store, loaded, name, env_values, None, seconds)
        return release, None
    return release, start_rollout(store, name, release, seconds)  # same config: a restart


def register(app: typer.Typer) -> None:
    app.command()(apply)
    app.command()(run)
    app.command()(redeploy)
