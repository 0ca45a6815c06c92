"""A real SGLang router (smg, the Shepherd Model Gateway, from PyPI) as a service's router group.

The router group runs what dstack's examples run (`pip install smg`, then `smg launch --host
0.0.0.0 --port 8000`, no initial workers) on dstackctl-python:latest, a stand-in for dstack's
base image (scripts/build-base-image.sh); the worker group runs images/openai-fake/server.py,
bind-mounted. The agent registers the ready workers with the router through smg's own
/workers API (dstackctl/agent/router_sync.py); every check below asks the real router.

Each answer through our endpoint proves its path: `system_fingerprint` (and the X-Fake-Replica
header) name the worker replica that wrote it ("$DSTACK_RUN_NAME $DSTACK_REPLICA_NUM
$DEPLOYMENT_TAG"), and `x-smg-routed-worker-id`, a header only smg adds, names the worker URL
it picked: that URL must be the answering replica's own address.

Needs the Docker engine, the dstackctl-python:latest image and the package index (the router
installs smg when it starts: about 10 s here).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import requests
from helpers import cli, free_port, ps_run, wait_until

from dstackctl.labels import home_label

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "dstackctl-python:latest"
SMG_VERSION = "1.13.0"
ROUTER_START = "300s"  # installing smg from the package index, then starting it
WAIT = 60.0
NAME = "smgsvc"
MODEL = "fake-model"


@pytest.fixture
def python_base_image(docker_client: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """dstackctl-python:latest as the image of replicas without `image:` (dstack's base image
    stands in for it), built by scripts/build-base-image.sh when it is missing or out of date
    (the script does nothing when it is up to date)."""
    script = REPO_ROOT / "scripts" / "build-base-image.sh"
    if script.exists():
        build = subprocess.run([str(script)], capture_output=True, text=True, check=False)
        problem = f"building {BASE_IMAGE} failed (exit {build.returncode}):\n{build.stdout}{build.stderr}"
    else:
        problem = f"{script} is missing"
    try:
        docker_client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        if os.environ.get("CI") == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    monkeypatch.setenv("DSTACK_DOCKER_BASE_IMAGE", BASE_IMAGE)
    return BASE_IMAGE


def write_service(directory: Path, port: int, workers: int, tag: str) -> Path:
    document = {
        "type": "service",
        "name": NAME,
        "port": f"{port}:8000",
        "volumes": [f"{REPO_ROOT / 'images' / 'openai-fake'}:/opt/fake:ro"],
        "replicas": [
            {
                "name": "router",
                "count": 1,
                "router": {"type": "smg"},
                "python": "3.11",
                "commands": [
                    f"uv pip install -q smg=={SMG_VERSION}",
                    # round_robin: every worker gets requests (the default, cache_aware, keeps
                    # one conversation on one worker).
                    "smg launch --host 0.0.0.0 --port 8000 --policy round_robin",
                ],
            },
            {
                "name": "workers",
                "count": workers,
                "commands": [
                    f"export DEPLOYMENT_TAG={tag}",
                    f"exec python3 /opt/fake/server.py --port 8000 --model {MODEL}",
                ],
            },
        ],
    }
    path = directory / f"{NAME}-{workers}-{tag}.dstack.yml"
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


def containers(docker_client: Any, home: Path, group: str) -> dict[str, Any]:
    labels = [f"dstackctl.run={NAME}", f"dstackctl.home={home_label(home)}", f"dstackctl.group={group}"]
    return {c.id: c for c in docker_client.containers.list(filters={"label": labels})}


def address(container: Any) -> str:
    networks = container.attrs["NetworkSettings"]["Networks"]
    [ip] = [n["IPAddress"] for n in networks.values() if n.get("IPAddress")]
    return f"http://{ip}:8000"


def ready_workers(capsys: pytest.CaptureFixture[str], docker_client: Any, home: Path) -> dict[str, str]:
    """Worker URL → the replica's key as the agent labels it ("workers/<replica>/<deployment>"),
    for each worker replica `ps` shows ready."""
    running = containers(docker_client, home, "workers")
    return {
        address(running[r["container_id"]]): f"workers/{r['replica_num']}/{r['deployment_num']}"
        for r in ps_run(capsys, NAME)["replicas"]
        if r["group"] == "workers" and r["ready"] and r["container_id"] in running
    }


def router_workers(url: str) -> dict[str, str]:
    """The real router's worker list (GET /workers through our endpoint, which sends all its
    traffic to the router group): worker URL → its dstack.ai/job-id label."""
    response = requests.get(f"{url}/workers", timeout=5)
    assert response.status_code == 200, response.text
    return {w["url"]: (w.get("labels") or {}).get("dstack.ai/job-id", "") for w in response.json()["workers"]}


def in_sync(capsys: pytest.CaptureFixture[str], docker_client: Any, home: Path, url: str, count: int) -> Any:
    wanted = ready_workers(capsys, docker_client, home)
    return (len(wanted) == count and router_workers(url) == wanted and wanted) or None


def chat(url: str, stream: bool = False) -> tuple[str, str]:
    """One chat completion through our endpoint: (the answering replica's identity, the worker
    URL the router says it routed to)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=30, stream=stream)
    assert response.status_code == 200, response.text
    routed = response.headers["x-smg-routed-worker-id"]
    if not stream:
        document = response.json()
        assert document["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
        return str(document["system_fingerprint"]), routed
    events = [line.removeprefix("data: ") for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7", events
    [identity] = {c["system_fingerprint"] for c in chunks}
    return str(identity), routed


def answers(url: str, workers: dict[str, str], count: int = 12) -> set[str]:
    """Identities of the replicas that answer `count` chats (a third streamed); each answer
    must come from the worker the router says it picked."""
    found = set()
    for i in range(count):
        identity, routed = chat(url, stream=i % 3 == 2)
        assert routed in workers, f"the router picked {routed}, not one of the ready workers {workers}"
        replica = workers[routed].split("/")[1]
        assert identity.split(" ")[1] == replica, f"{routed} ({workers[routed]}) answered as {identity!r}"
        found.add(identity)
    return found


def test_a_real_smg_router_routes_our_endpoints_chats_to_the_ready_workers_and_follows_them(
    dstack_home: Path,
    tmp_path: Path,
    python_base_image: str,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    started = cli(capsys, "run", "-d", write_service(tmp_path, port, 2, "v1"), "--timeout", ROUTER_START)
    assert started.code == 0, started.err
    url = ps_run(capsys, NAME)["url"]
    [router_id] = containers(docker_client, dstack_home, "router")

    # `ps -v` shows both groups: the router's one replica, then the two workers.
    table = cli(capsys, "ps", "-v", NAME).out.splitlines()
    assert [line[:33].rstrip() for line in table[2:]] == [
        "   group=0 replica=0 deployment=0",
        "   group=1 replica=0 deployment=0",
        "           replica=1 deployment=0",
    ], "\n".join(table)

    # The router holds exactly the ready workers, each labelled with its replica's key.
    first = wait_until(
        lambda: in_sync(capsys, docker_client, dstack_home, url, 2),
        timeout=WAIT,
        what="the router to hold both ready workers",
    )
    assert sorted(first.values()) == ["workers/0/0", "workers/1/0"]
    # Chats through our endpoint reach both workers through the router.
    assert wait_until(
        lambda: answers(url, first) == {f"{NAME} 0 v1", f"{NAME} 1 v1"} or None,
        timeout=WAIT,
        what="answers from both workers through the router",
    )

    # Added: one more worker joins the router once ready; the two others stay as they were.
    grown = cli(capsys, "redeploy", NAME, "-f", write_service(tmp_path, port, 3, "v1"), "--timeout", "60s")
    assert grown.code == 0, grown.err
    three = wait_until(
        lambda: in_sync(capsys, docker_client, dstack_home, url, 3),
        timeout=WAIT,
        what="the router to hold the third worker",
    )
    assert set(first.items()) < set(three.items())
    assert answers(url, three, 15) == {f"{NAME} 0 v1", f"{NAME} 1 v1", f"{NAME} 2 v1"}

    # Drained: scaled back to two, the third worker leaves the router.
    shrunk = cli(capsys, "redeploy", NAME, "-f", write_service(tmp_path, port, 2, "v1"), "--timeout", "60s")
    assert shrunk.code == 0, shrunk.err
    two = wait_until(
        lambda: in_sync(capsys, docker_client, dstack_home, url, 2),
        timeout=WAIT,
        what="the router to drop the third worker",
    )
    assert two == first
    assert answers(url, two) == {f"{NAME} 0 v1", f"{NAME} 1 v1"}

    # Replaced: a new worker version replaces both workers; the router holds the new ones only,
    # and the router itself (unchanged) keeps its container.
    replaced = cli(capsys, "redeploy", NAME, "-f", write_service(tmp_path, port, 2, "v2"), "--timeout", "60s")
    assert replaced.code == 0, replaced.err

    def replaced_in_router() -> Any:
        found = in_sync(capsys, docker_client, dstack_home, url, 2)
        return (found and set(found.values()).isdisjoint(first.values()) and found) or None

    new = wait_until(replaced_in_router, timeout=WAIT, what="the router to hold the new workers only")
    assert sorted(new.values()) == ["workers/0/1", "workers/1/1"]
    assert answers(url, new) == {f"{NAME} 0 v2", f"{NAME} 1 v2"}
    assert list(containers(docker_client, dstack_home, "router")) == [router_id]

    after = cli(capsys, "ps", "-v", NAME).out
    assert "group=0 replica=0 deployment=0" in after and "group=1 replica=0 deployment=1" in after, after
    assert cli(capsys, "stop", NAME).code == 0


def write_examples_shape(directory: Path, router: dict[str, Any]) -> Path:
    """The shape of dstack's docs (concepts/services.md, "prefill-decode", without PD): unnamed
    groups ("0" is the router, "1" the workers), `model:` (so the router group, and it alone,
    gets dstack's default model probe: it is ready only once it has workers)."""
    document = {
        "type": "service",
        "name": NAME,
        "port": f"{free_port()}:8000",
        "model": MODEL,
        "volumes": [f"{REPO_ROOT / 'images' / 'openai-fake'}:/opt/fake:ro"],
        "replicas": [
            {"count": 1, **router},
            {"count": 2, "commands": [f"exec python3 /opt/fake/server.py --port 8000 --model {MODEL}"]},
        ],
    }
    path = directory / f"{NAME}.dstack.yml"
    path.write_text(json.dumps(document))
    return path


def examples_workers_in_router(
    capsys: pytest.CaptureFixture[str], docker_client: Any, home: Path, url: str
) -> dict[str, str] | None:
    """The worker list when the router holds exactly the two ready workers of group "1"; None
    before, also while the endpoint has no router to ask (503) or does not answer."""
    running = containers(docker_client, home, "1")
    wanted = {
        address(running[r["container_id"]]): f"1/{r['replica_num']}/{r['deployment_num']}"
        for r in ps_run(capsys, NAME)["replicas"]
        if r["group"] == "1" and r["ready"] and r["container_id"] in running
    }
    try:
        held = router_workers(url)
    except (requests.RequestException, AssertionError):
        return None
    return wanted if len(wanted) == 2 and held == wanted else None


def start_examples_shape(
    capsys: pytest.CaptureFixture[str], docker_client: Any, home: Path, path: Path
) -> tuple[str, dict[str, str]]:
    started = cli(capsys, "run", "-d", path, "--timeout", ROUTER_START)
    assert started.code == 0, started.err
    run = ps_run(capsys, NAME)
    assert [(r["group"], r["ready"]) for r in run["replicas"]] == [("0", True), ("1", True), ("1", True)]
    url = str(run["url"])
    workers = wait_until(
        lambda: examples_workers_in_router(capsys, docker_client, home, url),
        timeout=WAIT,
        what="the router to hold both workers",
    )
    assert workers is not None
    for stream in (False, True):
        identity, routed = chat(url, stream)
        assert routed in workers and identity.split(" ")[:2] == [NAME, workers[routed].split("/")[1]]
    return url, workers


def test_the_dstack_examples_shape_legacy_type_pip_install_and_model_probe_serves_through_smg(
    dstack_home: Path,
    tmp_path: Path,
    python_base_image: str,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The older type name `sglang`, `python:` and `pip install smg`, as dstack's docs write it.
    router = {
        "python": "3.11",
        "commands": [f"pip install smg=={SMG_VERSION}", "smg launch --host 0.0.0.0 --port 8000"],
        "router": {"type": "sglang"},
    }
    start_examples_shape(capsys, docker_client, dstack_home, write_examples_shape(tmp_path, router))
    table = cli(capsys, "ps", "-v", NAME).out.splitlines()
    assert [line[:33].rstrip() for line in table[2:]] == [
        "   group=0 replica=0 deployment=0",
        "   group=1 replica=0 deployment=0",
        "           replica=1 deployment=0",
    ], "\n".join(table)
    # The router's model probe passes (it answers chats: it has workers); workers have none.
    assert ["\u2713" in line for line in table[2:]] == [True, False, False], "\n".join(table)
    assert cli(capsys, "stop", NAME).code == 0


def restart_and_settle(
    capsys: pytest.CaptureFixture[str], docker_client: Any, home: Path, url: str, workers: dict[str, str]
) -> str:
    """Start the router container again as the agent does after a Docker outage (the same
    container, its commands run again in the same file system); "serving" once the router
    holds `workers` again, else "exited: <its last log lines>"."""
    [container] = containers(docker_client, home, "0").values()
    container.restart(timeout=1)

    def settled() -> str | None:
        container.reload()
        if container.status == "exited":
            lines = container.logs(tail=3).decode(errors="replace").strip().splitlines()
            return "exited: " + " | ".join(lines)
        held = examples_workers_in_router(capsys, docker_client, home, url)
        return "serving" if held == workers else None

    return str(wait_until(settled, timeout=WAIT, what="the restarted router to serve or exit"))


def test_a_restarted_router_forgets_its_workers_and_the_agent_registers_them_again(
    dstack_home: Path,
    tmp_path: Path,
    python_base_image: str,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Its own venv (python3 -m venv is happy with one that exists): see the next test for why.
    router = {
        "commands": [
            "python3 -m venv /opt/smg",
            f"/opt/smg/bin/pip install -q smg=={SMG_VERSION}",
            "exec /opt/smg/bin/smg launch --host 0.0.0.0 --port 8000",
        ],
        "router": {"type": "smg"},
    }
    url, workers = start_examples_shape(
        capsys, docker_client, dstack_home, write_examples_shape(tmp_path, router)
    )
    # smg keeps no workers on disk: started again it has none; the agent registers them anew
    # (meanwhile the endpoint answers 503: its one router is down, then not ready, as its model
    # probe fails until it has workers).
    assert restart_and_settle(capsys, docker_client, dstack_home, url, workers) == "serving"
    identity, routed = chat(url, stream=True)
    assert routed in workers and identity.split(" ")[:2] == [NAME, workers[routed].split("/")[1]]
    assert cli(capsys, "stop", NAME).code == 0


def test_a_router_with_python_comes_back_when_its_container_is_started_again(
    dstack_home: Path,
    tmp_path: Path,
    python_base_image: str,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    router = {
        "python": "3.11",
        "commands": [f"uv pip install -q smg=={SMG_VERSION}", "smg launch --host 0.0.0.0 --port 8000"],
        "router": {"type": "smg"},
    }
    url, workers = start_examples_shape(
        capsys, docker_client, dstack_home, write_examples_shape(tmp_path, router)
    )
    assert restart_and_settle(capsys, docker_client, dstack_home, url, workers) == "serving"
    assert cli(capsys, "stop", NAME).code == 0
