"""Every service example in dstack's docs with a replica range runs here, with local parts.

Each example (tests/data/dstack_examples, collected from dstack's repository) keeps its shape:
its replicas, ranges, `scaling`, groups and router. What needs the internet or a GPU is put
in local terms: the test image instead of the image or `python` it names, a small HTTP
server (or the fake SMG router, for a router group) instead of its model server, no GPUs,
volumes or repos, a `/health` probe, and a value for each env variable it asks for. The
service must get ready at its ranges' minimums, autoscaled, and answer through its endpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from helpers import cli, free_port, ps_run, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

EXAMPLES = Path(__file__).parent.parent / "data" / "dstack_examples"
RANGED = sorted(path for path in EXAMPLES.glob("*.yml") if "scaling" in path.read_text())
SERVE = "mkdir -p /tmp/w && cp -r /www/* /tmp/w && echo ok > /tmp/w/health && exec httpd -f -p 8000 -h /tmp/w"
ROUTER = "exec nc -ll -p 8000 -e sh /www/fake-smg-router.sh"
# What a replica runs, which the local parts replace or which needs what this machine lacks.
REPLACED = ("image", "python", "nvcc", "docker", "privileged", "commands", "entrypoint", "resources")
DROPPED = ("volumes", "files", "repos", "model", "probes", "working_dir", "registry_auth", "env")


def local_parts(document: dict[str, Any], image: str, port: int, name: str) -> dict[str, Any]:
    local = {key: value for key, value in document.items() if key not in REPLACED + DROPPED}
    local.update(name=name, image=image, port=f"{port}:8000")
    local["probes"] = [{"type": "http", "url": "/health", "interval": "1s"}]
    local["env"] = {"EXAMPLE": name}
    groups = document.get("replicas")
    if isinstance(groups, list):
        local["replicas"] = [
            {
                **{key: value for key, value in group.items() if key not in REPLACED + DROPPED},
                "commands": [ROUTER if group.get("router") else SERVE],
            }
            for group in groups
        ]
    else:
        local["commands"] = [SERVE]
    return local


def minimums(document: dict[str, Any]) -> dict[str, int]:
    """Each autoscaled group's minimum, by group name (`0`, `1`, ... when unnamed)."""
    if not isinstance(document.get("replicas"), list):
        return {"0": int(str(document["replicas"]).split("..")[0] or 0)}
    found = {}
    for index, group in enumerate(document["replicas"]):
        if group.get("scaling"):
            size = str(group.get("replicas", group.get("count")))
            found[str(group.get("name", index))] = int(size.split("..")[0] or 0)
    return found


def test_the_examples_with_ranges_are_the_ones_issue_13_names() -> None:
    assert len(RANGED) == 13, [p.name for p in RANGED]


@pytest.mark.parametrize("path", RANGED, ids=[p.name.removesuffix(".yml") for p in RANGED])
def test_a_dstack_example_with_a_range_runs_with_local_parts(
    path: Path, dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    document = yaml.safe_load(path.read_text())
    name = f"ex{RANGED.index(path)}"
    port = free_port()
    local = tmp_path / f"{name}.dstack.yml"
    local.write_text(yaml.safe_dump(local_parts(document, test_image, port, name)))

    started = cli(capsys, "run", "-d", local, "--timeout", "60s")
    assert started.code == 0, started.err
    assert "autoscaled within" in started.out + started.err
    run = ps_run(capsys, name)
    scaling = run["scaling"]
    assert {group: s["desired"] for group, s in scaling.items()} == minimums(document)
    assert all(s["min"] <= s["desired"] <= s["max"] for s in scaling.values()), scaling

    # Through the endpoint (to the router group when there is one); at zero, this wakes it.
    response = requests.get(f"http://127.0.0.1:{port}/health", timeout=60)
    assert response.status_code == 200, response.text
    wait_until(lambda: ps_run(capsys, name)["ready_replicas"] >= 1, timeout=10, what="a ready replica")
    assert cli(capsys, "stop", name, "-y").code == 0
