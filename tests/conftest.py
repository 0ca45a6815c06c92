"""Fixtures shared by all test tiers: the Docker engine and the local test image."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def test_image(docker_client: Any) -> str:
    """The tag of the busybox test image, built by scripts/build-test-image.sh if missing."""
    try:
        docker_client.images.get(TEST_IMAGE)
    except docker.errors.ImageNotFound:
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
