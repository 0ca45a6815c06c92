"""Secrets stay in secrets.json (issue 15, item 6): a literal probe header value is not in
spec.json, the container's labels or its env, yet the probe sends it; a short secret (a PIN)
is masked in logs; the agent's command line carries no -e value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, write_service

from dstackctl.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.slow]

KEY = "literal-key-42"
SECRETS = ("-e", f"PROBES_API_KEY={KEY}", "-e", "PIN=987")


def test_probe_header_values_and_short_secrets_stay_secret(
    dstack_home: Path,
    tmp_path: Path,
    test_image: str,
    docker_client: object,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_service(
        tmp_path,
        "keeper",
        test_image,
        ["echo pin=$PIN workers=$WORKERS", "exec httpd -f -p 8000 -h /www"],
        env=["PROBES_API_KEY", "PIN", "WORKERS=2"],
        extra=f"probes:\n  - {{type: http, url: /cgi-bin/auth, interval: 1s, "
        f"headers: [{{name: X-API-Key, value: {KEY}}}]}}\n",
    )
    # Through the console entry point, which forks the agent from this very command line;
    # the probe passes only when the agent sends the literal header value.
    started = subprocess.run(
        [sys.executable, "-m", "dstackctl", "run", "-d", str(path), "--timeout", "60s", *SECRETS],
        env={**os.environ, "DSTACKCTL_HOME": str(dstack_home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr

    service = Store(dstack_home).service_dir("keeper")
    assert KEY not in (service / "spec.json").read_text()
    assert KEY in (service / "secrets.json").read_text()
    [container] = docker_client.containers.list(filters={"label": "dstackctl.run=keeper"})  # type: ignore[attr-defined]
    assert KEY not in json.dumps(container.labels)
    env = container.attrs["Config"]["Env"]
    assert not [entry for entry in env if entry.startswith("DSTACKCTL_PROBE_")], env

    processes = Store(dstack_home).agent_processes("keeper")
    assert len(processes) == 2, processes  # the agent and its supervisor
    for pid in processes:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert "dstackctl-agent keeper" in command_line and "987" not in command_line, command_line

    logs = cli(capsys, "logs", "keeper")
    assert "pin=*** workers=2" in logs.out, logs.out
    assert cli(capsys, "stop", "keeper", "-y").code == 0
