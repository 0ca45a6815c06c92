"""Replica groups on the real engine: each group runs its own command, all serve through the
endpoint, `ps` shows them as dstack does, and a redeploy replaces only the group it changes.

/cgi-bin/whoami answers "$DSTACK_RUN_NAME $DSTACK_REPLICA_NUM $DEPLOYMENT_TAG"; each group
exports its own DEPLOYMENT_TAG before it starts httpd, so an answer says which group served it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import cli, free_port, ps_run, wait_until

from dstackctl.labels import home_label
from dstackctl.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.slow]

WAIT = 30.0


def write_groups(directory: Path, name: str, image: str, front_tag: str, back_tag: str, port: int) -> Path:
    def group(group_name: str, count: int, tag: str) -> dict[str, Any]:
        command = f"export DEPLOYMENT_TAG={tag} && exec httpd -f -p 8000 -h /www"
        return {"name": group_name, "count": count, "commands": [command]}

    document = {
        "type": "service",
        "name": name,
        "image": image,
        "port": f"{port}:8000",
        "probes": [{"type": "http", "url": "/cgi-bin/health", "interval": "1s"}],
        "replicas": [group("front", 1, front_tag), group("back", 2, back_tag)],
    }
    path = directory / f"{name}-{back_tag}.dstack.yml"
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


def answers(url: str, count: int = 24) -> set[str]:
    found = set()
    for _ in range(count):
        response = requests.get(f"{url}/cgi-bin/whoami", timeout=5)
        assert response.status_code == 200, response.text
        found.add(response.text.strip())
    return found


def by_group(run: dict[str, Any]) -> dict[tuple[str, int], str]:
    return {(r["group"], r["replica_num"]): r["container_id"] for r in run["replicas"]}


def test_two_groups_serve_show_in_ps_and_a_redeploy_replaces_only_the_changed_group(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    first = write_groups(tmp_path, "duo", test_image, "front", "back", port)
    started = cli(capsys, "run", "-d", first, "--timeout", "60s")
    assert started.code == 0, started.err
    run = ps_run(capsys, "duo")
    assert sorted(by_group(run)) == [("back", 0), ("back", 1), ("front", 0)]
    assert all(r["ready"] for r in run["replicas"])
    url = run["url"]
    assert wait_until(
        lambda: answers(url) == {"duo 0 front", "duo 0 back", "duo 1 back"} or None,
        timeout=WAIT,
        what="answers from both groups",
    )

    table = cli(capsys, "ps", "-v", "duo").out.splitlines()
    names = [line[:33].rstrip() for line in table[2:]]
    assert names == [
        "   group=0 replica=0 deployment=0",
        "   group=1 replica=0 deployment=0",
        "           replica=1 deployment=0",
    ]

    before = by_group(run)
    second = write_groups(tmp_path, "duo", test_image, "front", "back2", port)
    redeployed = cli(capsys, "redeploy", "duo", "-f", second, "--timeout", "60s")
    assert redeployed.code == 0, redeployed.err
    after = by_group(ps_run(capsys, "duo"))
    assert after[("front", 0)] == before[("front", 0)], "the unchanged group's container was replaced"
    assert after[("back", 0)] != before[("back", 0)] and after[("back", 1)] != before[("back", 1)]
    assert answers(url) == {"duo 0 front", "duo 0 back2", "duo 1 back2"}

    # A lost record is rebuilt from the containers' labels, groups and all.
    store = Store(dstack_home)
    agent = store.agent_holder("duo")
    assert agent is not None
    os.kill(agent, signal.SIGKILL)
    wait_until(lambda: not store.agent_alive("duo"), timeout=10, what="the killed agent to let go")
    (store.service_dir("duo") / "spec.json").unlink()
    assert cli(capsys, "recover", "duo").code == 0

    def serving_again() -> bool | None:
        try:
            return answers(url, 6) == {"duo 0 front", "duo 0 back2", "duo 1 back2"} or None
        except requests.RequestException:
            return None  # the new agent has not bound the endpoint yet

    wait_until(serving_again, timeout=WAIT, what="the recovered service to answer from both groups")
    recovered = ps_run(capsys, "duo")
    assert recovered["agent_alive"]
    assert by_group(recovered) == after, "recover replaced containers instead of adopting them"
    assert cli(capsys, "stop", "duo").code == 0


def test_a_group_reaches_another_groups_replica_through_its_interpolated_address(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # The router group (dynamo: the endpoint sends it all traffic, nothing is synced) fetches
    # the backend's whoami through ${{ groups[1].replicas[0].IP_ADDRESS }} before it serves.
    fetch = (
        "until wget -qO /www/peer.txt http://${{ groups[1].replicas[0].IP_ADDRESS }}:8000/cgi-bin/whoami; "
        "do sleep 0.2; done"
    )
    document = {
        "type": "service",
        "name": "pair",
        "image": test_image,
        "port": f"{free_port()}:8000",
        "replicas": [
            {
                "name": "front",
                "count": 1,
                "router": {"type": "dynamo"},
                "commands": [fetch, "exec httpd -f -p 8000 -h /www"],
            },
            {
                "name": "back",
                "count": 1,
                "commands": ["export DEPLOYMENT_TAG=back && exec httpd -f -p 8000 -h /www"],
            },
        ],
    }
    path = tmp_path / "pair.dstack.yml"
    path.write_text(json.dumps(document))
    started = cli(capsys, "run", "-d", path, "--timeout", "60s")
    assert started.code == 0, started.err
    url = ps_run(capsys, "pair")["url"]
    response = requests.get(f"{url}/peer.txt", timeout=5)
    assert (response.status_code, response.text) == (200, "pair 0 back\n")
    mine = {"label": ["dstackctl.run=pair", f"dstackctl.home={home_label(dstack_home)}"]}
    assert len(docker_client.networks.list(filters=mine)) == 1
    assert cli(capsys, "stop", "pair").code == 0
    assert docker_client.networks.list(filters=mine) == []
