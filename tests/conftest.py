"""Fixtures shared by all test tiers: the Docker engine, the local test image, a private store."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_IMAGE = "dstackctl-testsrv:latest"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A docker-py client to a live engine.

    When the engine cannot be reached the test fails under ``CI=true`` and is skipped,
    with the reason, anywhere else.
    """
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        reason = f"Docker engine not reachable ({exc}); run scripts/setup.sh to start it"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    try:
        yield client
    finally:
        client.close()


def _image_is_stale(docker_client: Any) -> bool:
    """True when the test image is missing or older than the newest file of images/testsrv."""
    try:
        image = docker_client.images.get(TEST_IMAGE)
    except docker.errors.ImageNotFound:
        return True
    # "Created" is RFC 3339 with nanoseconds, e.g. "2025-01-02T03:04:05.123456789Z".
    created = datetime.fromisoformat(image.attrs["Created"][:19]).replace(tzinfo=timezone.utc)
    newest = max(p.stat().st_mtime for p in (REPO_ROOT / "images" / "testsrv").rglob("*"))
    return newest >= created.timestamp() + 1  # "Created" is cut to whole seconds above


@pytest.fixture(scope="session")
def test_image(docker_client: Any) -> str:
    """The tag of the busybox test image, built by scripts/build-test-image.sh when it is
    missing or older than a file of images/testsrv (a CGI script was added or changed)."""
    if _image_is_stale(docker_client):
        build = subprocess.run(
            [str(REPO_ROOT / "scripts" / "build-test-image.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        if build.returncode != 0:
            pytest.fail(
                f"building {TEST_IMAGE} failed (exit {build.returncode}):\n{build.stdout}{build.stderr}",
                pytrace=False,
            )
    return TEST_IMAGE


def _remove_home_containers(label: str) -> None:
    """Remove every container and network carrying ``dstackctl.home=<label>``; nothing to do
    without an engine. (Docker has ~30 address pools: leaked networks would exhaust them.)"""
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        return  # no engine, so no container of this home can exist
    try:
        for container in client.containers.list(all=True, filters={"label": f"dstackctl.home={label}"}):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        for network in client.networks.list(filters={"label": f"dstackctl.home={label}"}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                network.remove()
    finally:
        client.close()


@pytest.fixture
def dstack_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ``$DSTACKCTL_HOME`` for one test.

    Teardown stops every agent of that home (``dstackctl stop --all``, in-process, then any
    agent still alive) and removes every container labelled with the home's label, whatever
    the test left behind.
    """
    from dstackctl.agent.process import stop_agent
    from dstackctl.cli.main import run
    from dstackctl.labels import home_label
    from dstackctl.store import HOME_VARIABLE, Store

    home = tmp_path / "dstackctl-home"
    monkeypatch.setenv(HOME_VARIABLE, str(home))
    label = home_label(home)
    try:
        yield home
    finally:
        code = run(["stop", "--all"])
        store = Store(home)
        for name in store.names():
            stop_agent(store, name)
        _remove_home_containers(label)
        assert code == 0, f"`dstackctl stop --all` exited {code} while cleaning up {home}"
