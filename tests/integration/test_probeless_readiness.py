"""Readiness without probes is earned (design.md section 10): a replica without probes is
ready only once a TCP connection to its container's own address succeeds; one that exits
first is failed, never ready, and a rollout never drains an old replica behind it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import cli, ps_run, write_service

from dstackctl.labels import home_label

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HTTPD = "httpd -f -p 8000 -h /www"
NO_PROBES = "probes: []\n"
TRIES = 20


def _containers(docker_client: Any, home: Path, name: str) -> list[str]:
    filters = {"label": [f"dstackctl.run={name}", f"dstackctl.home={home_label(home)}"]}
    return sorted(c.id for c in docker_client.containers.list(all=True, filters=filters))


def test_run_d_of_a_probeless_replica_that_exits_fails_on_every_try(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_service(tmp_path, "quitter", test_image, ["exit 3"], extra=NO_PROBES)
    outcomes = []
    for _attempt in range(TRIES):
        result = cli(capsys, "run", "-d", "--timeout", "60s", config)
        outcomes.append((result.code, "replica=0 failed: exited with code 3" in result.err))
        assert cli(capsys, "stop", "quitter").code == 0
    assert outcomes == [(1, True)] * TRIES


def test_a_probeless_replica_that_listens_is_ready(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_service(tmp_path, "listener", test_image, [HTTPD], replicas=2, extra=NO_PROBES)
    result = cli(capsys, "run", "-d", "--timeout", "60s", config)
    assert result.code == 0, result.err
    shown = ps_run(capsys, "listener")
    assert [(r["status"], r["ready"], r["probes"]) for r in shown["replicas"]] == [("running", True, [])] * 2


def test_a_rollout_to_a_probeless_replica_that_exits_rolls_back_and_never_drains_the_old_ones(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = write_service(tmp_path, "survivor", test_image, [HTTPD], replicas=2, extra=NO_PROBES)
    (tmp_path / "v2").mkdir()
    v2 = tmp_path / "v2" / v1.name
    v2.write_text(v1.read_text().replace(f"commands: {json.dumps([HTTPD])}", 'commands: ["exit 3"]'))
    assert 'commands: ["exit 3"]' in v2.read_text()
    assert cli(capsys, "run", "-d", "--timeout", "60s", v1).code == 0
    before = ps_run(capsys, "survivor")
    old = sorted(r["container_id"] for r in before["replicas"])

    result = cli(capsys, "redeploy", "survivor", "-f", v2, "--timeout", "60s")

    assert result.code == 1, result.err
    assert "rolled back to deployment 0: replica=0 (deployment 1) failed: exited with code 3" in result.err
    after = ps_run(capsys, "survivor")
    assert after["rollout"]["state"] == "rolled_back"
    assert [(r["deployment_num"], r["status"], r["ready"]) for r in after["replicas"]] == [
        (0, "running", True)
    ] * 2
    assert sorted(r["container_id"] for r in after["replicas"]) == old, "an old replica was drained"
    assert _containers(docker_client, dstack_home, "survivor") == old
