"""Replica groups on the real engine: each group runs its own command, all serve through the
endpoint, `ps` shows them as dstack does, and a redeploy replaces only the group it changes.

/cgi-bin/whoami answers "$DSTACK_RUN_NAME $DSTACK_REPLICA_NUM $DEPLOYMENT_TAG"; each group
exports its own DEPLOYMENT_TAG before it starts httpd, so an answer says which group served it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import cli, free_port, kill_agent_and_supervisor, ps_run, wait_until

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
    kill_agent_and_supervisor(store, "duo")
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


ROUTER_URL = re.compile(r'"url":"([^"]*)"')


def router_worker_urls(container: Any) -> set[str]:
    """The worker URLs the fake SMG router (images/testsrv/www/fake-smg-router.sh) holds."""
    _, output = container.exec_run(["sh", "-c", "cat /tmp/workers/* 2>/dev/null"])
    return set(ROUTER_URL.findall(output.decode()))


def workers_of(docker_client: Any, home: Path, name: str) -> list[Any]:
    labels = [f"dstackctl.run={name}", f"dstackctl.home={home_label(home)}", "dstackctl.group=workers"]
    return list(docker_client.containers.list(filters={"label": labels}))


def worker_urls(docker_client: Any, home: Path, name: str) -> set[str]:
    urls = set()
    for container in workers_of(docker_client, home, name):
        networks = container.attrs["NetworkSettings"]["Networks"]
        urls.update(f"http://{n['IPAddress']}:8000" for n in networks.values() if n.get("IPAddress"))
    return urls


def write_routed(directory: Path, name: str, image: str, tag: str, port: int) -> Path:
    document = {
        "type": "service",
        "name": name,
        "image": image,
        "port": f"{port}:8000",
        "replicas": [
            {
                "name": "router",
                "count": 1,
                "router": {"type": "smg"},
                "commands": [
                    "rm -rf /tmp/workers /tmp/calls",
                    "exec nc -ll -p 8000 -e sh /www/fake-smg-router.sh",
                ],
            },
            {
                "name": "workers",
                "count": 2,
                "commands": [f"export DEPLOYMENT_TAG={tag} && exec httpd -f -p 8000 -h /www"],
            },
        ],
    }
    path = directory / f"{name}-{tag}.dstack.yml"
    path.write_text(json.dumps(document))
    return path


def test_an_smg_router_group_gets_the_ready_workers_loses_drained_ones_and_regains_them_after_a_restart(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    started = cli(
        capsys, "run", "-d", write_routed(tmp_path, "routed", test_image, "v1", port), "--timeout", "60s"
    )
    assert started.code == 0, started.err
    filters = {
        "label": [
            "dstackctl.run=routed",
            f"dstackctl.home={home_label(dstack_home)}",
            "dstackctl.group=router",
        ]
    }
    [router] = docker_client.containers.list(filters=filters)

    def in_sync() -> bool | None:
        wanted = worker_urls(docker_client, dstack_home, "routed")
        return (len(wanted) == 2 and router_worker_urls(router) == wanted) or None

    wait_until(in_sync, timeout=WAIT, what="the router to hold both ready workers")
    first = worker_urls(docker_client, dstack_home, "routed")
    first_ids = {c.id for c in workers_of(docker_client, dstack_home, "routed")}
    # The endpoint sends traffic to the router group alone: its /workers answers through it.
    listed = requests.get(f"{ps_run(capsys, 'routed')['url']}/workers", timeout=5).json()
    assert {w["url"] for w in listed["workers"]} == first

    # A redeploy of the workers: new ones join as they get ready, drained ones leave.
    redeployed = cli(
        capsys, "redeploy", "routed", "-f", write_routed(tmp_path, "routed", test_image, "v2", port)
    )
    assert redeployed.code == 0, redeployed.err
    wait_until(in_sync, timeout=WAIT, what="the router to hold the new workers only")
    assert first_ids.isdisjoint(c.id for c in workers_of(docker_client, dstack_home, "routed"))
    calls = router.exec_run(["cat", "/tmp/calls"]).output.decode()
    assert calls.count("DELETE /workers/") >= 2 and calls.count("POST /workers") >= 4
    [still] = docker_client.containers.list(filters=filters)
    assert still.id == router.id, "the unchanged router group was replaced"

    # A restarted router forgets its workers and its calls (its command clears both); the
    # agent registers the workers again.
    router.restart(timeout=1)

    def registered_again() -> bool | None:
        calls = router.exec_run(["sh", "-c", "cat /tmp/calls 2>/dev/null"]).output.decode()
        return (calls.count("POST /workers") >= 2 and "DELETE" not in calls and in_sync()) or None

    wait_until(registered_again, timeout=WAIT, what="the router to get its workers back after a restart")
    assert cli(capsys, "stop", "routed").code == 0
