"""Who may call a running service (issue 15 item 5): with `auth: true` its endpoint needs the
token that `dstackctl token NAME` prints (kept 0600, never shown anywhere else, the same across
redeploys); every endpoint refuses a Host that is not this machine's (DNS rebinding)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from helpers import cli, ps_run, wait_until, write_service

from dstackctl.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HTTP_TIMEOUT = 10.0


def dstackctl(home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The console entry point in a subprocess, as a script runs it (it forks the agent)."""
    result = subprocess.run(
        [sys.executable, "-m", "dstackctl", *(str(arg) for arg in args)],
        env={**os.environ, "DSTACKCTL_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def status_of(url: str, **headers: str) -> int:
    return requests.get(url + "/", headers=headers, timeout=HTTP_TIMEOUT).status_code


def test_auth_true_needs_the_token_that_only_dstackctl_token_prints(
    dstack_home: Path,
    tmp_path: Path,
    test_image: str,
    docker_client: object,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_service(
        tmp_path, "guarded", test_image, ["exec httpd -f -p 8000 -h /www"], extra="auth: true\n"
    )
    started = dstackctl(dstack_home, "run", "-d", path, "--timeout", "60s")
    assert started.returncode == 0, started.stderr

    shown = dstackctl(dstack_home, "token", "guarded")
    assert shown.returncode == 0, shown.stderr
    token = shown.stdout.strip()
    assert len(token) >= 40 and shown.stdout == token + "\n"
    url = ps_run(capsys, "guarded")["url"]
    port = url.rsplit(":", 1)[1]

    refused = requests.get(url + "/", timeout=HTTP_TIMEOUT)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer ")
    assert "dstackctl token guarded" in refused.json()["error"]
    assert status_of(url, Authorization="Bearer not-the-token") == 401
    assert status_of(url, Authorization=f"Bearer {token}") == 200
    assert status_of(url, Authorization=f"Bearer {token}", Host=f"localhost:{port}") == 200
    assert status_of(url, Authorization=f"Bearer {token}", Host="evil.example") == 421

    folder = Store(dstack_home).service_dir("guarded")
    assert stat.S_IMODE((folder / "token.json").stat().st_mode) == 0o600
    assert_token_nowhere_else(dstack_home, folder, token, docker_client, capsys)

    # Auth off (a rolling update): the endpoint is open, and `token` says why it prints none.
    path.write_text(path.read_text().replace("auth: true\n", ""))
    assert dstackctl(dstack_home, "run", "-d", "-y", path, "--timeout", "60s").returncode == 0
    wait_until(lambda: status_of(url) == 200, 10, "the endpoint to take requests without a token")
    assert status_of(url, Host="evil.example") == 421  # the Host check stays
    off = dstackctl(dstack_home, "token", "guarded")
    assert off.returncode == 1 and off.stdout == ""
    assert off.stderr.startswith("error: guarded has auth off") and off.stderr.count("\n") == 1

    # Auth on again: the same token as before (kept for the service's life).
    path.write_text(path.read_text() + "auth: true\n")
    assert dstackctl(dstack_home, "run", "-d", "-y", path, "--timeout", "60s").returncode == 0
    wait_until(lambda: status_of(url) == 401, 10, "the endpoint to require the token again")
    assert dstackctl(dstack_home, "token", "guarded").stdout.strip() == token
    assert status_of(url, Authorization=f"Bearer {token}") == 200

    unknown, ps_unknown = dstackctl(dstack_home, "token", "nosuch"), dstackctl(dstack_home, "ps", "nosuch")
    assert (unknown.returncode, unknown.stderr) == (ps_unknown.returncode, ps_unknown.stderr)
    assert unknown.returncode == 1
    assert cli(capsys, "stop", "guarded").code == 0


def assert_token_nowhere_else(
    home: Path, folder: Path, token: str, docker_client: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only token.json holds it: not ps (any format), spec, state, secrets, the agent's log or
    command line, the container's labels, env or output."""
    outputs = [cli(capsys, "ps", *args).out for args in ([], ["-v", "--wide"], ["--json"])]
    outputs.append(cli(capsys, "logs", "guarded").out)
    for path in folder.rglob("*"):
        if path.is_file() and path.name != "token.json":
            outputs.append(path.read_bytes().decode(errors="replace"))
    [container] = docker_client.containers.list(filters={"label": "dstackctl.run=guarded"})  # type: ignore[attr-defined]
    outputs += [json.dumps(container.labels), json.dumps(container.attrs["Config"])]
    processes = Store(home).agent_processes("guarded")
    assert len(processes) == 2, processes  # the agent and its supervisor
    outputs += [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") for pid in processes]
    leaks = [text[:200] for text in outputs if token in text]
    assert leaks == []
