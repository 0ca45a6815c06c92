"""What `run` and `apply` do once their options are known, kept free of typer: the console
script runs a plain `run` through `fast_run` without loading typer (~80 ms of the time before
the service's agent can start); the Typer commands in deploy_commands.py call the same code."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstackctl.cli.following import (
    Progress,
    attach,
    parse_timeout,
    print_result,
    report,
    wait_rollout_and_report,
)
from dstackctl.cli.output import echo, state, warn
from dstackctl.cli.validate_files import DEFAULT_CONFIG
from dstackctl.errors import ExitCode, UsageError
from dstackctl.wording import replicas_of

if TYPE_CHECKING:
    from dstackctl.config.loader import LoadedConfig

DEFAULT_TIMEOUT = "10m"


@dataclass(frozen=True)
class Options:
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


def run_command(path: Path, name: str | None, options: Options) -> int:
    state.as_json = options.as_json
    if options.detach and options.no_wait and not options.as_json:
        raise UsageError("-d waits until ready and --no-wait does not wait: choose one")
    from dstackctl.deploy import run_name

    seconds = parse_timeout(options.timeout)
    if options.dry_run:
        from dstackctl.cli.plan_view import dry_run

        return dry_run(path, name, options.env, options.port)
    loaded, env_values = load(path, options.env)
    service = run_name(loaded, name)
    return _start(loaded, service, env_values, seconds, options)


def load(path: Path, env: list[str]) -> tuple[LoadedConfig, dict[str, str]]:
    """The validated file (its warnings printed) and its env values with the -e overrides."""
    from dstackctl.config.loader import load_service_file
    from dstackctl.deploy import parse_env_overrides

    loaded = load_service_file(path)
    for issue in loaded.warnings:
        warn(str(issue))
    overrides = parse_env_overrides(env, os.environ)
    return loaded, {**loaded.resolve_env({**os.environ, **overrides}), **overrides}


def _start(
    loaded: LoadedConfig, service: str, env_values: dict[str, str], seconds: int, options: Options
) -> int:
    from dstackctl.agent import warm_start
    from dstackctl.deploy import gpu_plan, submit, wants_gpus
    from dstackctl.docker_ping import ping_local_engine
    from dstackctl.endpoint_port import endpoint_port
    from dstackctl.store import Store

    engine = None  # docker-py is not loaded for a local engine when no GPU is wanted
    if wants_gpus(loaded) or not ping_local_engine():  # connect() pings for itself
        from dstackctl.docker import DockerEngine

        engine = DockerEngine.connect()
    store = Store()
    port, detach, no_wait = options.port, options.detach, options.no_wait
    spec = store.read(service, "spec") if store.exists(service) else None
    if spec is None or spec.get("desired") != "running":
        gpu_plan(loaded, engine)  # fail before starting anything when the GPUs are not there
    else:
        confirmed = _confirm_changes(store, loaded, service, env_values, options.yes)
        move_endpoint(store, service, endpoint_port(loaded, port))
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
        echo(f"{service}: rolling update to deployment {submitted.deployment_num}.", err=True)
        if no_wait:
            return print_submitted(store, service, "rollout")
        return wait_rollout_and_report(
            store, service, seconds, submitted.deployment_num, loaded.config.total_replicas
        )
    if submitted.outcome == "unchanged":
        echo(f"{service} is already running with this configuration.", err=state.as_json)
        if not detach:
            return ExitCode.OK
    elif submitted.outcome == "scaled":
        echo(f"{service}: scaling to {replicas_of(*loaded.config.replica_span)} in place.", err=True)
    if no_wait:
        echo(f"Submitted {service}; `dstackctl ps -v {service}` shows its progress.", err=state.as_json)
        return print_submitted(store, service, submitted.outcome)
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
    echo(f"{service}: rolling update to deployment {number}.", err=True)
    if no_wait:
        return print_submitted(store, service, "rollout")
    return wait_rollout_and_report(store, service, seconds, number, loaded.config.total_replicas)


def print_submitted(store: Any, service: str, action: str) -> int:
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
        echo(
            f"Interrupted; {service} keeps starting in the background "
            f"(`dstackctl ps -v {service}`, `dstackctl stop {service}`).",
            err=True,
        )
        return ExitCode.INTERRUPTED
    report(outcome, action)
    return None


def move_endpoint(store: Any, name: str, port: int) -> None:
    from dstackctl.endpoint_port import move_endpoint

    old = move_endpoint(store, name, port)
    if old is not None:
        echo(f"{name}: moving the endpoint from port {old} to {port}.", err=True)


# `run` and `apply` options this parser takes as typer does; anything else (help, --opt=value,
# combined short flags, a value that looks like an option, an option given twice) goes to typer.
_FLAGS = {"-d": "detach", "--detach": "detach", "--no-wait": "no_wait", "-y": "yes", "--yes": "yes"}
_FLAGS |= {"--json": "as_json"}
_VALUED = {"-f": "file", "--file": "file", "-n": "name", "--name": "name", "--timeout": "timeout"}
_VALUED |= {"-e": "env", "--env": "env", "--port": "port"}
_ONLY = {"run": {"--dry-run": "dry_run"}, "apply": {"--force": "force"}}


def fast_run(command: str, args: list[str]) -> int | None:
    """`run` or `apply` without loading typer; None: let typer parse `args` (and report)."""
    flags = _FLAGS | _ONLY[command]
    given: dict[str, Any] = {"env": []}
    positional: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg in flags:
            given[flags[arg]] = True
        elif arg in _VALUED:
            key, value = _VALUED[arg], next(rest, None)
            if value is None or value.startswith("-") or (key != "env" and key in given):
                return None
            given[key] = [*given["env"], value] if key == "env" else value
        elif arg.startswith("-") or not arg or positional:
            return None
        else:
            positional.append(arg)
    port = given.get("port")
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return None
    as_json = given.get("as_json", False)
    options = Options(
        given.get("detach", False) or as_json,
        given.get("no_wait", False),
        given.get("timeout", DEFAULT_TIMEOUT),
        given.get("dry_run", False),
        given["env"],
        None if port is None else int(port),
        given.get("yes", False),
        given.get("force", False),
        as_json,
    )
    path = Path(positional[0]) if positional else None
    option = Path(given["file"]) if "file" in given else None
    return run_command(config_file(path, option), given.get("name"), options)
