"""Small helpers shared by the test tiers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy and return that value.

    Raises ``AssertionError`` naming ``what`` (and the last value seen) when ``timeout``
    seconds pass first. Exceptions raised by ``predicate`` propagate: catch the expected
    ones (a refused connection, say) inside the predicate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now, below the range the kernel and Docker hand
    out as ephemeral ports (32768 and up), so a published replica port cannot take it."""
    for _attempt in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no free TCP port found in 20000..31999 on 127.0.0.1")


def write_service(
    directory: Path,
    name: str,
    image: str,
    commands: list[str],
    replicas: int = 1,
    env: list[str] | None = None,
    extra: str = "",
) -> Path:
    """Write a dstack ``type: service`` file named ``<name>.dstack.yml`` and return its path.

    The replicas listen on container port 8000; the service endpoint gets a free local port
    (``port: "LOCAL:8000"``), so services of different tests never compete for one.
    ``commands`` and ``env`` entries are written as YAML flow scalars (JSON strings);
    ``extra`` is appended verbatim (whole YAML lines).
    """
    lines = [
        "type: service",
        f"name: {name}",
        f"image: {image}",
        f'port: "{free_port()}:8000"',
        f"replicas: {replicas}",
        f"commands: {json.dumps(commands)}",
    ]
    if env:
        lines.append(f"env: {json.dumps(env)}")
    path = directory / f"{name}.dstack.yml"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Result:
    """Run dstackctl in-process and return its exit code and what it printed (never a traceback)."""
    from dstackctl.cli.main import run

    capsys.readouterr()  # drop what earlier steps printed
    code = run([str(arg) for arg in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err, captured.err
    return Result(code, captured.out, captured.err)


def ps_run(capsys: pytest.CaptureFixture[str], name: str) -> dict[str, Any]:
    """The run `name` as `ps --json NAME` shows it."""
    result = cli(capsys, "ps", "--json", name)
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["version"] == 1
    [found] = document["runs"]
    assert found["name"] == name
    return dict(found)


def fast_path_of(argv: list[str]) -> tuple[int, str, str] | None:
    """`argv` on the installed entry point's fast path (exit code, stdout, stderr), or None
    when it hands over to typer."""
    from dstackctl.cli.entry import run_fast_path

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_fast_path(argv)
    return None if code is None else (code, out.getvalue(), err.getvalue())


def kill_agent_and_supervisor(store: Any, name: str) -> None:
    """SIGKILL a service's supervisor, then its agent (the other way round, the supervisor
    would restart the agent), and wait until the agent lock is free."""
    processes = store.agent_processes(name)
    assert len(processes) == 2, f"expected an agent and its supervisor, found {processes}"
    for pid in reversed(processes):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not store.agent_alive(name), timeout=10, what=f"the killed agent of {name} to let go")
