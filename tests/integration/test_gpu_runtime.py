"""A GPU service on an engine without the NVIDIA runtime: the right device request, one sentence."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import docker
import pytest
from helpers import write_service

from dstackctl.cli.main import run
from dstackctl.labels import home_label

pytestmark = pytest.mark.slow

FAKE_SMI = """#!/bin/sh
echo "0, GPU-11111111-aaaa, NVIDIA A10G, 23028"
echo "1, GPU-22222222-bbbb, NVIDIA A10G, 23028"
"""


@pytest.fixture
def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(FAKE_SMI)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("DSTACKCTL_NVIDIA_SMI", str(script))
    return script


@pytest.mark.docker
def test_gpu_request_reaches_docker_and_fails_with_the_runtime_sentence(
    docker_client: docker.DockerClient,
    test_image: str,
    dstack_home: Path,
    fake_gpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if "nvidia" in (docker_client.info().get("Runtimes") or {}):
        pytest.fail("this engine has the NVIDIA runtime; the test needs one without it")
    path = write_service(
        tmp_path,
        "gpu-svc",
        test_image,
        ["httpd -f -p 8000 -h /www"],
        replicas=2,
        extra="resources:\n  gpu: 24GB..48GB\n",
    )
    assert run(["run", "--dry-run", str(path)]) == 0
    plan = capsys.readouterr().out
    assert "replica=0: GPU 0 (NVIDIA A10G 24GB, GPU-11111111-aaaa)" in plan
    assert "replica=1: GPU 1 (NVIDIA A10G 24GB, GPU-22222222-bbbb)" in plan

    assert run(["run", "-d", "--timeout", "60s", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no NVIDIA GPU runtime; install nvidia-container-toolkit" in err
    assert "Traceback" not in err and "could not select device driver" not in err
    log = (dstack_home / "services" / "gpu-svc" / "agent.log").read_text()
    assert (
        "replica=0 gets GPUs ['GPU-11111111-aaaa'] (device request device_ids=['GPU-11111111-aaaa'])" in log
    )
    assert "replica=1 gets GPUs ['GPU-22222222-bbbb']" in log
    left = docker_client.containers.list(
        all=True, filters={"label": f"dstackctl.home={home_label(dstack_home)}"}
    )
    assert left == []
    assert run(["ps", "gpu-svc", "--json"]) == 0
    replicas = json.loads(capsys.readouterr().out)["runs"][0]["replicas"]
    assert [r["status"] for r in replicas] == ["failed", "failed"]


@pytest.mark.docker
def test_not_enough_gpus_is_refused_before_anything_starts(
    docker_client: docker.DockerClient,
    test_image: str,
    dstack_home: Path,
    fake_gpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_service(
        tmp_path,
        "gpu-big",
        test_image,
        ["httpd -f -p 8000 -h /www"],
        replicas=2,
        extra="resources:\n  gpu: A10G:2\n",
    )
    assert run(["run", "-d", str(path)]) == 1
    err = capsys.readouterr().err
    assert "needs 4 x A10G for 2 replicas; found 2 x NVIDIA A10G 24GB" in err
    assert not (dstack_home / "services" / "gpu-big" / "spec.json").exists()
    assert run(["run", "--dry-run", str(path)]) == 1
