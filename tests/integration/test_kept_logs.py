"""Logs that last: the agent keeps each replica's output (secrets masked), so `logs` shows
replaced replicas and works after `stop`, and `logs -f` follows the service across a redeploy."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import cli, wait_until, write_service

from dstackctl.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HTTPD = "httpd -f -p 8000 -h /www"
SECRET = "s3cr3t-token-value"


def chatty(tmp_path: Path, test_image: str, tag: str) -> Path:
    commands = [f'echo "{tag} says hi from $DSTACK_REPLICA_NUM with $TOKEN"', HTTPD]
    path = write_service(tmp_path, "keeper", test_image, commands, env=[f"TOKEN={SECRET}"])
    return path.rename(path.with_name(f"keeper-{tag}.dstack.yml"))


def test_logs_show_replaced_replicas_survive_stop_and_mask_secrets(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "run", "-d", "--timeout", "60s", chatty(tmp_path, test_image, "v1")).code == 0
    result = cli(capsys, "redeploy", "keeper", "-f", chatty(tmp_path, test_image, "v2"), "--timeout", "60s")
    assert result.code == 0, result.err

    def both() -> list[str] | None:
        lines = cli(capsys, "logs", "keeper").out.splitlines()
        return lines if len(lines) == 2 else None

    lines = wait_until(both, timeout=15, what="the old and the new replica's line")
    assert lines == [
        "replica=0 deployment=0 | v1 says hi from 0 with ***",
        "replica=0 deployment=1 | v2 says hi from 0 with ***",
    ]
    folder = Store(dstack_home).service_dir("keeper") / "logs"
    assert all(SECRET not in p.read_text() for p in folder.iterdir())
    assert all(p.stat().st_mode & 0o077 == 0 for p in folder.iterdir())

    assert cli(capsys, "stop", "keeper").code == 0
    after = cli(capsys, "logs", "keeper")
    assert after.code == 0, after.err
    assert after.out.splitlines() == lines
    assert cli(capsys, "logs", "keeper", "--since", "1h").out.splitlines() == lines
    assert cli(capsys, "logs", "keeper", "--since", "2000-01-01T00:00:00Z", "--tail", "0").out == ""


def test_logs_follow_the_service_across_a_redeploy_until_it_stops(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "run", "-d", "--timeout", "60s", chatty(tmp_path, test_image, "v1")).code == 0
    follower = subprocess.Popen(
        [sys.executable, "-m", "dstackctl", "logs", "-f", "keeper"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(line.rstrip("\n") for line in follower.stdout or []))
    reader.start()
    wait_until(lambda: "v1 says hi" in " ".join(seen) or None, timeout=15, what="the first replica's line")
    redeployed = cli(
        capsys, "redeploy", "keeper", "-f", chatty(tmp_path, test_image, "v2"), "--timeout", "60s"
    )
    assert redeployed.code == 0, redeployed.err
    wait_until(lambda: "v2 says hi" in " ".join(seen) or None, timeout=15, what="the new replica joining")
    assert cli(capsys, "stop", "keeper").code == 0
    assert follower.wait(timeout=15) == 0, "logs -f did not end when the service stopped"
    reader.join(5)
    assert seen == ["replica=0 | v1 says hi from 0 with ***", "replica=0 | v2 says hi from 0 with ***"]
