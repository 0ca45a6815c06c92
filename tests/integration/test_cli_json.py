"""`--json` on run/apply, redeploy and stop: one object on stdout for CI scripts, words on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli, write_service

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HTTPD = "httpd -f -p 8000 -h /www"


def test_run_redeploy_and_stop_print_one_json_object(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "scripted", test_image, [HTTPD], replicas=2)

    started = cli(capsys, "apply", "--json", "--timeout", "60s", "-f", path)  # --json implies -d
    assert started.code == 0, started.err
    document = json.loads(started.out)
    assert (document["name"], document["outcome"], document["exit_code"], document["deployment"]) == (
        "scripted",
        "started",
        0,
        0,
    )
    assert document["url"].startswith("http://127.0.0.1:")
    assert [(r["replica_num"], r["ready"]) for r in document["replicas"]] == [(0, True), (1, True)]
    assert "scripted is ready (2 of 2 replicas)" in started.err

    again = cli(capsys, "run", "--json", path)
    assert again.code == 0 and json.loads(again.out)["outcome"] == "unchanged"

    redeployed = cli(capsys, "redeploy", "scripted", "--json", "--timeout", "60s")
    assert redeployed.code == 0, redeployed.err
    assert (json.loads(redeployed.out)["outcome"], json.loads(redeployed.out)["deployment"]) == ("rollout", 1)

    stopped = cli(capsys, "stop", "scripted", "ghost", "--json")
    assert stopped.code == 1
    assert json.loads(stopped.out) == {
        "services": [
            {"name": "scripted", "outcome": "stopped", "message": "2 containers removed"},
            {
                "name": "ghost",
                "outcome": "failed",
                "message": "no service named ghost; `dstackctl ps -a` lists them",
            },
        ]
    }
