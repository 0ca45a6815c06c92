"""The Docker engine and the busybox test image, through docker-py with no mocks.

These tests check the ground the other integration tests stand on: the engine runs
containers of the locally built image, and its CGI endpoints behave as documented in
images/testsrv.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from helpers import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

RUN_LABEL = "pytest-engine"
HTTP_TIMEOUT = 5.0


def _remove_labelled(client: Any) -> None:
    for container in client.containers.list(all=True, filters={"label": f"dstackctl.run={RUN_LABEL}"}):
        container.remove(force=True)


@pytest.fixture
def engine_containers(docker_client: Any) -> Iterator[Any]:
    """The docker client; every container labelled ``dstackctl.run=pytest-engine`` is
    removed before and after the test."""
    _remove_labelled(docker_client)
    try:
        yield docker_client
    finally:
        _remove_labelled(docker_client)


def test_runs_a_command_and_returns_its_logs(engine_containers: Any, test_image: str) -> None:
    container = engine_containers.containers.run(
        test_image,
        ["/bin/echo", "hello"],
        detach=True,
        labels={"dstackctl.run": RUN_LABEL},
    )
    try:
        result = container.wait(timeout=30)
        assert result["StatusCode"] == 0
        assert container.logs() == b"hello\n"
    finally:
        container.remove(force=True)


def _status(url: str, **kwargs: Any) -> int | None:
    """The HTTP status of a GET, or None while the server does not answer yet."""
    try:
        return requests.get(url, timeout=HTTP_TIMEOUT, **kwargs).status_code
    except requests.ConnectionError:
        return None


def test_test_server_endpoints(engine_containers: Any, test_image: str) -> None:
    container = engine_containers.containers.run(
        test_image,
        detach=True,
        ports={"8000/tcp": ("127.0.0.1", None)},
        labels={"dstackctl.run": RUN_LABEL},
        environment={
            "READY_AFTER_SECONDS": "2",
            "PROBES_API_KEY": "s3cret",
            "DSTACK_RUN_NAME": "engine-test",
            "DSTACK_REPLICA_NUM": "1",
            "DEPLOYMENT_TAG": "v7",
        },
    )
    try:
        container.reload()
        host_port = container.ports["8000/tcp"][0]["HostPort"]
        base = f"http://127.0.0.1:{host_port}"

        wait_until(
            lambda: _status(f"{base}/cgi-bin/health") == 503,
            timeout=10,
            what="/cgi-bin/health to answer 503 while the server is loading",
        )
        wait_until(
            lambda: _status(f"{base}/cgi-bin/health") == 200,
            timeout=10,
            what="/cgi-bin/health to answer 200 after READY_AFTER_SECONDS=2",
        )

        assert requests.get(f"{base}/cgi-bin/auth", timeout=HTTP_TIMEOUT).status_code == 401
        wrong = requests.get(f"{base}/cgi-bin/auth", headers={"X-API-Key": "wrong"}, timeout=HTTP_TIMEOUT)
        assert wrong.status_code == 401
        right = requests.get(f"{base}/cgi-bin/auth", headers={"X-API-Key": "s3cret"}, timeout=HTTP_TIMEOUT)
        assert right.status_code == 200

        body = "line one\nline two with spaces & symbols=1\n"
        echo = requests.post(f"{base}/cgi-bin/echo", data=body, timeout=HTTP_TIMEOUT)
        assert echo.status_code == 200
        assert echo.text == f"POST\n{body}"

        redirect = requests.get(f"{base}/cgi-bin/status?302", allow_redirects=False, timeout=HTTP_TIMEOUT)
        assert redirect.status_code == 302
        assert redirect.headers["Location"] == "/"

        whoami = requests.get(f"{base}/cgi-bin/whoami", timeout=HTTP_TIMEOUT)
        assert whoami.status_code == 200
        assert whoami.text == "engine-test 1 v7\n"

        # A replica that turns unhealthy later on.
        exit_code, _ = container.exec_run(["/bin/touch", "/tmp/unhealthy"])
        assert exit_code == 0
        assert _status(f"{base}/cgi-bin/health") == 503
    finally:
        container.remove(force=True)
