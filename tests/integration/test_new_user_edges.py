"""Rough edges a new user hit (issue 14, part 8), each on the real engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cli, free_port, ps_run, wait_until, write_service

from dstackctl.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HTTPD = "httpd -f -p 8000 -h /www"


def test_a_port_held_by_another_service_names_it_and_leaves_no_folder_behind(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    first = write_service(tmp_path, "holder", test_image, [HTTPD])
    first.write_text(first.read_text().replace('port: "', f'port: "{port}:8000"\n#', 1))
    assert cli(capsys, "run", "-d", "--timeout", "60s", first).code == 0
    second = write_service(tmp_path, "taker", test_image, [HTTPD])
    second.write_text(second.read_text().replace('port: "', f'port: "{port}:8000"\n#', 1))

    result = cli(capsys, "run", "-d", "--timeout", "60s", second)

    assert result.code == 1
    assert f"port {port} on 127.0.0.1 is in use by the endpoint of holder (dstackctl)" in result.err
    assert not Store(dstack_home).service_dir("taker").exists()


def test_the_agent_shows_as_dstackctl_agent_in_ps_not_as_the_command_that_started_it(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "titled", test_image, [HTTPD])
    assert cli(capsys, "run", "-d", "--timeout", "60s", path).code == 0
    pid = Store(dstack_home).agent_holder("titled")
    assert pid is not None
    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    assert title == f"dstackctl-agent titled --home {dstack_home}"


def test_nothing_listening_on_the_port_says_so_and_names_the_port(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "deaf", test_image, [HTTPD], extra="probes:\n  - {type: http, url: /}\n")
    path.write_text(path.read_text().replace(':8000"', ':9000"'))  # the app listens on 8000
    assert cli(capsys, "run", "--no-wait", path).code == 0

    def error() -> str | None:
        rows = ps_run(capsys, "deaf")["replicas"]
        return (rows[0]["probes"][0]["last_error"] if rows and rows[0]["probes"] else None) or None

    message = wait_until(error, timeout=30, what="the probe's first error")
    assert message == "nothing answers on port 9000 inside the container; check `port:`"


def test_redeploy_e_without_a_file_changes_a_value_of_the_running_config(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import requests

    path = write_service(tmp_path, "tagged", test_image, [HTTPD], env=["DEPLOYMENT_TAG=v1"])
    assert cli(capsys, "run", "-d", "--timeout", "60s", path).code == 0
    url = ps_run(capsys, "tagged")["url"]
    assert requests.get(f"{url}/cgi-bin/whoami", timeout=5).text == "tagged 0 v1\n"

    result = cli(capsys, "redeploy", "tagged", "-e", "DEPLOYMENT_TAG=v2", "--timeout", "60s")

    assert result.code == 0, result.err
    assert "tagged now runs deployment 1 (1 replica)" in result.out
    assert requests.get(f"{url}/cgi-bin/whoami", timeout=5).text == "tagged 0 v2\n"
