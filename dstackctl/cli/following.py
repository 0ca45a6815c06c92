"""What `run` and `redeploy` show while they wait: progress lines, the outcome, the logs."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from dstackctl.cli import gc_policy
from dstackctl.cli.output import echo, state
from dstackctl.errors import DstackctlError, ExitCode, UsageError

if TYPE_CHECKING:
    from dstackctl.runs import RunView
    from dstackctl.waiting import Outcome


def parse_timeout(text: str) -> int:
    from dstackctl.config.units import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from None
    if seconds <= 0:
        raise UsageError("--timeout must be at least 1s")
    return seconds


def wait_rollout_and_report(
    store: Any, service: str, seconds: int, deployment_num: int, replicas: int
) -> int:
    from dstackctl.deploy import forget_previous_env
    from dstackctl.waiting import wait_rollout

    # Each new replica has `seconds` to get ready; the rollback is bounded the same way.
    overall = seconds * (2 * replicas + 2)
    try:
        outcome = wait_rollout(store, service, deployment_num, overall, Progress().show)
    except KeyboardInterrupt:
        echo(
            f"Interrupted; the agent carries on with the rollout of {service} (`dstackctl ps -v {service}`).",
            err=True,
        )
        return ExitCode.INTERRUPTED
    if outcome.exit_code == ExitCode.OK:
        forget_previous_env(store, service)
    report(outcome, "rollout")
    return ExitCode.OK


def wait_scaled(store: Any, service: str, seconds: int) -> int:
    from dstackctl.waiting import wait_ready

    outcome = wait_ready(store, service, seconds, Progress().show)
    report(outcome, "scaled")
    return ExitCode.OK


def report(outcome: Outcome, action: str) -> None:
    """Print a successful wait's outcome with the URLs; raise a failed one (its exit code).
    With --json, the result object goes to stdout in both cases, the sentence to stderr."""
    if state.as_json:
        print_result(outcome.view, action, outcome.exit_code, outcome.message)
    if outcome.exit_code != ExitCode.OK:
        raise DstackctlError(outcome.message, outcome.exit_code)
    echo(outcome.message + urls(outcome.view), err=state.as_json)


def print_result(view: RunView | None, action: str, exit_code: int, message: str) -> None:
    """`--json`: what a CI script needs of the command's result, as one object."""
    import json

    document = {
        "name": view.name if view else None,
        "url": view.url if view else None,
        "deployment": view.deployment_num if view else None,
        "outcome": action,
        "exit_code": int(exit_code),
        "message": message,
        "replicas": view.to_json()["replicas"] if view else [],
    }
    echo(json.dumps(document))


def urls(view: RunView | None) -> str:
    if view is None:
        return ""
    if view.url:
        return f": {view.url}"
    urls = [r.url for r in view.replicas if r.url]
    return f": {', '.join(urls)}" if urls else ""


class Progress:
    """Prints a line whenever a replica's status or message changes (to stderr)."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int, int], str] = {}
        gc_policy.resume_for_a_long_run()  # it shows a wait of seconds to minutes

    def show(self, view: RunView) -> None:
        several = len({r.deployment_num for r in view.replicas}) > 1
        for replica in view.replicas:
            key = (replica.group, replica.replica_num, replica.deployment_num)
            text = replica.describe()
            if replica.ready:
                text = f"{replica.name} ready on {replica.url}"
            if several:
                text = text.replace(f"{replica.name} ", f"{replica.name} deployment={key[2]} ", 1)
            if self._last.get(key) == text:
                continue
            self._last[key] = text
            echo(text, err=True)


def attach(store: Any, service: str) -> int:
    from dstackctl.replica_logs import Filter, follow_service

    echo(f"Showing the logs of {service}; Ctrl-C detaches (the service keeps running).", err=True)
    try:
        print_logs(follow_service(store, service, Filter(), None), prefix=True)
    except KeyboardInterrupt:
        echo(f"\nDetached. {service} keeps running; stop it with `dstackctl stop {service}`.", err=True)
        return ExitCode.OK
    echo(f"{service} stopped; `dstackctl ps -a {service}` shows it.", err=True)
    return ExitCode.OK


def print_logs(lines: Any, prefix: bool) -> None:
    gc_policy.resume_for_a_long_run()
    out = sys.stdout.buffer
    for source, line in lines:
        if prefix:
            out.write(f"{source} | ".encode())
        out.write(line)
        out.flush()
