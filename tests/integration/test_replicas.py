"""Replicas on the real engine, driven through the in-process CLI (`dstackctl.cli.main.run`).

The agent is still a real detached process and the containers are real; each test has its
own ``$DSTACKCTL_HOME`` (fixture ``dstack_home``), whose teardown stops the agents and
removes every container carrying that home's label.
"""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import cli, kill_agent_and_supervisor, ps_run, wait_until, write_service

from dstackctl.labels import home_label
from dstackctl.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HTTPD = "httpd -f -p 8000 -h /www"
HTTP_TIMEOUT = 5.0
WAIT = 30.0  # generous upper bound for anything the agent does on a 2-core machine


def labelled(docker_client: Any, home: Path, name: str) -> list[Any]:
    """Every container (running or not) of service `name` in the store at `home`."""
    filters = {"label": [f"dstackctl.run={name}", f"dstackctl.home={home_label(home)}"]}
    return list(docker_client.containers.list(all=True, filters=filters))


def http_text(url: str) -> str | None:
    """The body of a 200 answer, or None while the server does not answer (yet)."""
    try:
        response = requests.get(url, timeout=HTTP_TIMEOUT)
    except requests.ConnectionError:
        return None
    return response.text if response.status_code == 200 else None


def replica_statuses(capsys: pytest.CaptureFixture[str], name: str) -> dict[int, str]:
    return {r["replica_num"]: r["status"] for r in ps_run(capsys, name)["replicas"]}


def test_three_replicas_run_on_distinct_ports_that_answer_http(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "trio", test_image, [HTTPD], replicas=3)

    result = cli(capsys, "run", "-d", "--timeout", "60s", path)

    assert result.code == 0, result.err
    assert "trio is ready (3 of 3 replicas)" in result.out
    shown = ps_run(capsys, "trio")
    assert shown["status"] == "running"
    assert shown["agent_alive"] is True
    replicas = shown["replicas"]
    assert [r["replica_num"] for r in replicas] == [0, 1, 2]
    assert [(r["status"], r["ready"]) for r in replicas] == [("running", True)] * 3
    ports = [r["host_port"] for r in replicas]
    assert all(isinstance(port, int) for port in ports), ports
    assert len(set(ports)) == 3, f"host ports are not distinct: {ports}"
    for replica in replicas:
        url = f"http://127.0.0.1:{replica['host_port']}/cgi-bin/whoami"
        body = wait_until(lambda url=url: http_text(url), timeout=10, what=f"{url} to answer 200")
        # whoami prints "$DSTACK_RUN_NAME $DSTACK_REPLICA_NUM $DEPLOYMENT_TAG"
        assert body == f"trio {replica['replica_num']} \n"
    containers = labelled(docker_client, dstack_home, "trio")
    assert sorted(c.id for c in containers) == sorted(r["container_id"] for r in replicas)
    assert {c.status for c in containers} == {"running"}


def test_stop_removes_every_container_of_the_service_and_only_those(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Replica 1 exits at once, so stop must also remove a container that is no longer running.
    gives_up = 'if [ "$DSTACK_REPLICA_NUM" = 1 ]; then exit 4; fi'
    quartet = write_service(tmp_path, "quartet", test_image, [gives_up, HTTPD], replicas=3)
    bystander = write_service(tmp_path, "bystander", test_image, [HTTPD])
    assert cli(capsys, "run", "--no-wait", quartet).code == 0
    assert cli(capsys, "run", "-d", "--timeout", "60s", bystander).code == 0
    wait_until(
        lambda: replica_statuses(capsys, "quartet") == {0: "running", 1: "failed", 2: "running"},
        timeout=WAIT,
        what="quartet's replicas 0 and 2 running and replica 1 failed",
    )
    assert sorted(c.status for c in labelled(docker_client, dstack_home, "quartet")) == [
        "exited",
        "running",
        "running",
    ]

    result = cli(capsys, "stop", "quartet")

    assert result.code == 0, result.err
    assert "Stopped quartet (3 containers removed)." in result.out
    assert labelled(docker_client, dstack_home, "quartet") == []
    [kept] = labelled(docker_client, dstack_home, "bystander")
    assert kept.status == "running"
    stopped = ps_run(capsys, "quartet")
    assert stopped["status"] == "terminated"
    assert stopped["agent_alive"] is False
    assert [r["status"] for r in stopped["replicas"]] == ["terminated", "failed", "terminated"]
    listed = json.loads(cli(capsys, "ps", "--json").out)["runs"]
    assert [r["name"] for r in listed] == ["bystander"]


def test_restarted_agent_adopts_the_containers_without_duplicating_them(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "phoenix", test_image, [HTTPD], replicas=3)
    assert cli(capsys, "run", "-d", "--timeout", "60s", path).code == 0
    store = Store(dstack_home)
    before = {r["replica_num"]: r["container_id"] for r in ps_run(capsys, "phoenix")["replicas"]}
    assert len(before) == 3
    old_pid = store.agent_holder("phoenix")
    assert old_pid is not None

    kill_agent_and_supervisor(store, "phoenix")
    result = cli(capsys, "run", "-d", "--timeout", "60s", path)

    assert result.code == 0, result.err
    assert "phoenix is already running with this configuration." in result.out
    assert "the agent of phoenix was not running; restarted it" in result.err
    new_pid = wait_until(
        lambda: store.agent_holder("phoenix"), timeout=WAIT, what="the new agent to take its lock"
    )
    assert new_pid != old_pid
    # Wait for a second write of the new agent: its first reconcile (adopt or create) is done.
    first_beat = (store.read("phoenix", "state") or {})["agent"]["heartbeat_at"]
    wait_until(
        lambda: (store.read("phoenix", "state") or {})["agent"]["heartbeat_at"] != first_beat,
        timeout=WAIT,
        what="the new agent to write its state again",
    )
    after = ps_run(capsys, "phoenix")
    assert after["agent_alive"] is True
    assert {r["replica_num"]: r["container_id"] for r in after["replicas"]} == before
    assert [r["status"] for r in after["replicas"]] == ["running"] * 3
    containers = labelled(docker_client, dstack_home, "phoenix")
    assert sorted(c.id for c in containers) == sorted(before.values())
    log = store.log_path("phoenix").read_text()
    since_restart = log.split(f"agent for phoenix started (pid {new_pid})", 1)[1]
    assert "started as" not in since_restart
    assert "removing" not in since_restart


def test_a_replica_whose_command_exits_shows_failed_with_its_exit_code(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(
        tmp_path, "crasher", test_image, ["echo loading weights", "echo cannot load model >&2", "exit 3"]
    )
    assert cli(capsys, "run", "--no-wait", path).code == 0

    [replica] = wait_until(
        lambda: [r for r in ps_run(capsys, "crasher")["replicas"] if r["status"] == "failed"],
        timeout=WAIT,
        what="replica 0 of crasher to show failed",
    )

    assert replica["exit_code"] == 3
    assert replica["ready"] is False
    assert replica["message"] == "exited with code 3"
    # stdout and stderr are separate streams: their relative order is not kept
    assert sorted(replica["log_tail"]) == ["cannot load model", "loading weights"]
    assert ps_run(capsys, "crasher")["status"] == "failed"
    table = cli(capsys, "ps", "-v", "crasher")
    assert table.code == 0
    [row] = [line for line in table.out.splitlines() if "replica=0" in line]
    assert "failed (exit 3)" in row


def test_logs_of_one_replica_show_its_output(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = [
        'echo "hello from replica $DSTACK_REPLICA_NUM"',
        'echo "last words of $DSTACK_REPLICA_NUM"',
        HTTPD,
    ]
    path = write_service(tmp_path, "chatty", test_image, commands, replicas=2)
    assert cli(capsys, "run", "-d", "--timeout", "60s", path).code == 0

    def all_lines() -> list[str] | None:
        result = cli(capsys, "logs", "chatty")
        assert result.code == 0, result.err
        lines = result.out.splitlines()
        return lines if len(lines) >= 4 else None

    everything = wait_until(all_lines, timeout=10, what="both replicas to print their two lines")
    assert everything == [
        "replica=0 | hello from replica 0",
        "replica=0 | last words of 0",
        "replica=1 | hello from replica 1",
        "replica=1 | last words of 1",
    ]
    both = cli(capsys, "logs", "chatty", "--replica", "1", "--tail", "2")
    assert (both.code, both.out) == (0, "hello from replica 1\nlast words of 1\n")
    last = cli(capsys, "logs", "chatty", "--replica", "1", "--tail", "1")
    assert (last.code, last.out) == (0, "last words of 1\n")
    missing = cli(capsys, "logs", "chatty", "--replica", "7")
    assert missing.code == 1
    assert "chatty has no container for replica=7" in missing.err


def test_env_values_stay_out_of_ps_the_state_files_and_the_agent_log(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    file_secret = f"hunter2-{uuid.uuid4().hex}"
    cli_secret = f"swordfish-{uuid.uuid4().hex}"
    path = write_service(
        tmp_path,
        "leaky",
        test_image,
        ['echo "token=$SECRET_TOKEN cli=$CLI_TOKEN"', "exit 5"],
        env=[f"SECRET_TOKEN={file_secret}"],
    )
    assert cli(capsys, "run", "--no-wait", "-e", f"CLI_TOKEN={cli_secret}", path).code == 0
    [replica] = wait_until(
        lambda: [r for r in ps_run(capsys, "leaky")["replicas"] if r["status"] == "failed"],
        timeout=WAIT,
        what="replica 0 of leaky to show failed",
    )
    # The values did reach the container: it printed them.
    [container] = labelled(docker_client, dstack_home, "leaky")
    assert container.logs() == f"token={file_secret} cli={cli_secret}\n".encode()

    assert replica["log_tail"] == ["token=*** cli=***"]
    outputs = {
        "ps --json": cli(capsys, "ps", "--json"),
        "ps -a --json": cli(capsys, "ps", "-a", "--json"),
        "ps -v --wide": cli(capsys, "ps", "-v", "--wide"),
        "ps -v --wide leaky": cli(capsys, "ps", "-v", "--wide", "leaky"),
    }
    for command, result in outputs.items():
        assert result.code == 0, f"{command}: {result.err}"
        for secret in (file_secret, cli_secret):
            assert secret not in result.out + result.err, f"`{command}` shows an env value"
    folder = Store(dstack_home).service_dir("leaky")
    # Every file, also the kept logs (logs/, made when the agent starts copying a replica's
    # output: there or not yet, depending on timing).
    files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
    assert {"spec.json", "state.json", "secrets.json", "agent.log"} <= set(files)
    for name, file in files.items():
        content = file.read_bytes()
        for secret in (file_secret, cli_secret):
            if name == "secrets.json":
                assert secret.encode() in content  # the agent needs them, and reads them here
            else:
                assert secret.encode() not in content, f"{name} holds an env value"
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, f"{name} is not 0600"
    for directory in (
        dstack_home,
        dstack_home / "services",
        folder,
        *(p for p in folder.rglob("*") if p.is_dir()),
    ):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, f"{directory} is not 0700"
    assert json.loads(files["spec.json"].read_text())["config"]["env"] == ["SECRET_TOKEN"]


def test_probe_header_and_url_values_stay_out_of_ps_and_the_state_files(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    api_key = f"key-{uuid.uuid4().hex}"
    url_token = f"tok-{uuid.uuid4().hex}"
    probes = (
        "probes:\n"
        "  - type: http\n"
        "    url: /cgi-bin/auth?token=${{ env.URL_TOKEN }}\n"
        "    headers:\n"
        "      - name: X-API-Key\n"
        "        value: ${{ env.PROBES_API_KEY }}\n"
        "    interval: 1s\n"
    )
    path = write_service(
        tmp_path,
        "guarded",
        test_image,
        [HTTPD],
        env=[f"PROBES_API_KEY={api_key}", f"URL_TOKEN={url_token}"],
        extra=probes,
    )

    # /cgi-bin/auth answers 200 only to the right X-API-Key: ready means the value was sent.
    result = cli(capsys, "run", "-d", "--timeout", "60s", path)

    assert result.code == 0, result.err
    [replica] = ps_run(capsys, "guarded")["replicas"]
    assert replica["ready"] is True
    [probe] = replica["probes"]
    assert probe["url"] == "/cgi-bin/auth?token=${{ env.URL_TOKEN }}"
    assert probe["symbol"] == "✓"
    shown = [
        result,
        cli(capsys, "ps", "--json"),
        cli(capsys, "ps", "-v", "--wide"),
        cli(capsys, "ps", "-a", "-v", "--wide", "--json"),
    ]
    for secret in (api_key, url_token):
        for output in shown:
            assert secret not in output.out + output.err
        folder = Store(dstack_home).service_dir("guarded")
        for file in folder.iterdir():
            if file.name != "secrets.json":
                assert secret.encode() not in file.read_bytes(), f"{file.name} holds an env value"
