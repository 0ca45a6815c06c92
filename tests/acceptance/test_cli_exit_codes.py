"""Exit codes of the installed `dstackctl` entry point, run in a subprocess as scripts do.

Contract (design.md section 6): 0 ok; 1 the operation failed (a replica failed, a Docker
error, no service of that name); 2 bad usage or invalid configuration; 3 a new service was
not ready within `run --timeout`. Errors are one sentence on stderr, never a traceback.
Every test has its own ``$DSTACKCTL_HOME`` (fixture ``dstack_home``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import kill_agent_and_supervisor, wait_until, write_service

from dstackctl.labels import home_label
from dstackctl.store import Store

pytestmark = pytest.mark.slow

HTTPD = "httpd -f -p 8000 -h /www"
NO_DOCKER = "unix:///nonexistent.sock"
DOCKER_DOWN = "Docker is not running"
HEALTH_PROBE = "probes:\n  - type: http\n    url: /cgi-bin/health\n    interval: 1s\n"


def _entry_point() -> str:
    found = shutil.which("dstackctl", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.fail(f"no dstackctl entry point next to {sys.executable}; run `pip install -e .`")
    return found


def dstackctl(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI (inheriting $DSTACKCTL_HOME); fail on any traceback."""
    result = subprocess.run(
        [_entry_point(), *(str(arg) for arg in args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def _run(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one run in the output of `ps --json NAME`."""
    assert result.returncode == 0, result.stderr
    [found] = json.loads(result.stdout)["runs"]
    return dict(found)


def containers_of(docker_client: Any, home: Path) -> list[Any]:
    return list(
        docker_client.containers.list(all=True, filters={"label": f"dstackctl.home={home_label(home)}"})
    )


# --- no Docker needed ----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["ps", "ghost"], ["stop", "ghost"], ["logs", "ghost"]])
def test_an_unknown_name_exits_1(dstack_home: Path, command: list[str]) -> None:
    # Knowing that no such service exists needs the store only, not the engine.
    result = dstackctl(*command, env={"DOCKER_HOST": NO_DOCKER})

    assert result.returncode == 1
    assert result.stderr.startswith("error: no service named ghost")
    assert result.stdout == ""


def test_ps_without_a_name_exits_0_on_an_empty_store(dstack_home: Path) -> None:
    result = dstackctl("ps")

    assert result.returncode == 0
    assert "No services" in result.stdout


def test_an_invalid_config_exits_2(dstack_home: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.dstack.yml"
    path.write_text("type: service\nimage: busybox\nport: 8000\nreplicas: -1\ncomands: [true]\n")

    result = dstackctl("run", "-d", path)

    assert result.returncode == 2
    assert "replicas" in result.stderr
    assert "did you mean 'commands'" in result.stderr
    assert not dstack_home.exists()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["-e", "1BAD=x"], "-e '1BAD'"),
        (["-e", "DSTACKCTL_TEST_SURELY_UNSET"], "DSTACKCTL_TEST_SURELY_UNSET is not set"),
        (["--timeout", "1m30s"], "--timeout: expected a duration"),
        (["--timeout", "0s"], "--timeout must be at least 1s"),
        (["--timeout", "soon"], "--timeout: expected a duration"),
    ],
)
def test_bad_options_exit_2(dstack_home: Path, tmp_path: Path, args: list[str], complaint: str) -> None:
    path = write_service(tmp_path, "opts", "dstackctl-testsrv:latest", [HTTPD])

    result = dstackctl("run", "-d", *args, path)

    assert result.returncode == 2
    assert complaint in result.stderr
    assert not dstack_home.exists(), "a rejected run must not touch the store"


def assert_docker_down(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert DOCKER_DOWN in result.stderr
    assert result.stderr.count("\n") == 1, f"expected one line, got: {result.stderr!r}"


def test_run_without_docker_exits_1_with_one_sentence(dstack_home: Path, tmp_path: Path) -> None:
    path = write_service(tmp_path, "nodocker", "dstackctl-testsrv:latest", [HTTPD])

    assert_docker_down(dstackctl("run", "-d", path, env={"DOCKER_HOST": NO_DOCKER}))
    assert not dstack_home.exists(), "a run that could not reach Docker must not touch the store"


@pytest.mark.docker
def test_stop_and_logs_without_docker_exit_1_and_leave_the_service_alone(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any
) -> None:
    path = write_service(tmp_path, "stranded", test_image, [HTTPD])
    assert dstackctl("run", "-d", "--timeout", "60s", path).returncode == 0

    assert_docker_down(dstackctl("logs", "stranded", env={"DOCKER_HOST": NO_DOCKER}))
    assert_docker_down(dstackctl("stop", "stranded", env={"DOCKER_HOST": NO_DOCKER}))

    shown = _run(dstackctl("ps", "--json", "stranded"))
    assert (shown["status"], shown["agent_alive"]) == ("running", True)
    [container] = containers_of(docker_client, dstack_home)
    assert container.status == "running"


def test_dry_run_prints_the_plan_and_touches_nothing(dstack_home: Path, tmp_path: Path) -> None:
    path = write_service(tmp_path, "planned", "dstackctl-testsrv:latest", [HTTPD], replicas=3)

    # No engine at all: a dry run must not even need Docker.
    result = dstackctl("run", "--dry-run", path, env={"DOCKER_HOST": NO_DOCKER})

    assert result.returncode == 0, result.stderr
    assert "Plan for planned" in result.stdout
    assert "replicas:  3" in result.stdout
    assert "dstackctl-testsrv:latest" in result.stdout
    assert not dstack_home.exists(), "a dry run must not touch the store"


@pytest.mark.docker
def test_dry_run_creates_no_container(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any
) -> None:
    path = write_service(tmp_path, "planned", test_image, [HTTPD], replicas=2)

    result = dstackctl("run", "--dry-run", path)

    assert result.returncode == 0, result.stderr
    assert containers_of(docker_client, dstack_home) == []


# --- on the real engine --------------------------------------------------------------------


@pytest.mark.docker
def test_run_exits_0_when_ready_and_again_when_already_running(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any
) -> None:
    path = write_service(tmp_path, "steady", test_image, [HTTPD], replicas=2)

    first = dstackctl("run", "-d", "--timeout", "60s", path)
    again = dstackctl("run", "-d", "--timeout", "60s", path)

    assert first.returncode == 0, first.stderr
    assert "steady is ready (2 of 2 replicas)" in first.stdout
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert len(containers_of(docker_client, dstack_home)) == 2


@pytest.mark.docker
def test_run_with_a_changed_config_rolls_out_and_exits_0(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any
) -> None:
    # Design section 6: a changed config under a taken name is shown and needs confirming;
    # without a terminal, exit 2 with how to go ahead and nothing touched; with -y, a rolling
    # update as `redeploy -f`.
    path = write_service(tmp_path, "evolving", test_image, [HTTPD])
    assert dstackctl("run", "-d", "--timeout", "60s", path).returncode == 0
    [old] = containers_of(docker_client, dstack_home)
    path.write_text(path.read_text().replace(f'["{HTTPD}"]', f'["echo v2", "{HTTPD}"]'))

    refused = dstackctl("run", "-d", "--timeout", "60s", path)
    assert refused.returncode == 2, refused.stderr
    assert "evolving is running with another configuration; this file changes:" in refused.stderr
    assert "  commands: " in refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(
        "error: evolving is running with another configuration; pass -y"
    )
    assert [c.id for c in containers_of(docker_client, dstack_home)] == [old.id]

    result = dstackctl("run", "-d", "-y", "--timeout", "60s", path)

    assert result.returncode == 0, result.stderr
    assert "evolving: rolling update to deployment 1." in result.stderr
    shown = _run(dstackctl("ps", "--json", "evolving"))
    assert shown["deployment_num"] == 1
    assert [(r["deployment_num"], r["status"], r["ready"]) for r in shown["replicas"]] == [
        (1, "running", True)
    ]
    [new] = containers_of(docker_client, dstack_home)
    assert new.id != old.id
    assert new.labels["dstackctl.deployment"] == "1"


@pytest.mark.docker
@pytest.mark.parametrize(
    ("image", "commands", "extra", "reason"),
    [
        # The probe keeps the replica from being ready before its command has exited.
        ("{test_image}", ["echo giving up", "exit 3"], HEALTH_PROBE, "exited with code 3"),
        # Nothing listens on port 1: the pull is refused at once.
        ("127.0.0.1:1/dstackctl-missing:latest", [HTTPD], "", "pulling it failed"),
        ("{test_image}", [HTTPD], "user: nosuchuser\n", "unable to find user nosuchuser"),
    ],
    ids=["command-exits", "image-cannot-be-pulled", "container-cannot-start"],
)
def test_run_exits_1_when_a_replica_fails(
    dstack_home: Path,
    tmp_path: Path,
    test_image: str,
    image: str,
    commands: list[str],
    extra: str,
    reason: str,
) -> None:
    path = write_service(tmp_path, "doomed", image.format(test_image=test_image), commands, extra=extra)

    result = dstackctl("run", "-d", "--timeout", "60s", path)

    assert result.returncode == 1, result.stderr
    assert "replica=0 failed" in result.stderr
    assert reason in result.stderr
    [replica] = _run(dstackctl("ps", "--json", "doomed"))["replicas"]
    assert replica["status"] == "failed"


@pytest.mark.docker
def test_run_exits_3_when_probes_do_not_pass_within_the_timeout(
    dstack_home: Path, tmp_path: Path, test_image: str
) -> None:
    # /cgi-bin/health answers 503 for the first READY_AFTER_SECONDS of the container's life.
    path = write_service(
        tmp_path, "sluggish", test_image, [HTTPD], env=["READY_AFTER_SECONDS=600"], extra=HEALTH_PROBE
    )

    result = dstackctl("run", "-d", "--timeout", "1s", path)

    assert result.returncode == 3, result.stderr
    assert "sluggish was not ready within 1s" in result.stderr
    assert "it keeps running" in result.stderr
    # The service keeps running after the deadline (as `compose up --wait` does), and `ps`
    # shows why it is not ready.
    [replica] = wait_until(
        lambda: [r for r in _run(dstackctl("ps", "--json", "sluggish"))["replicas"] if r["probes"]],
        timeout=30,
        what="sluggish's replica to be probed",
    )
    assert (replica["status"], replica["ready"]) == ("running", False)
    assert [(p["symbol"], p["last_error"]) for p in replica["probes"]] == [("×", "HTTP 503")]
    assert _run(dstackctl("ps", "--json", "sluggish"))["agent_alive"] is True


@pytest.mark.docker
def test_run_exits_3_when_the_image_pull_outlasts_the_timeout(
    dstack_home: Path, tmp_path: Path, test_image: str
) -> None:
    # A "registry" that accepts connections and never answers: the image pull hangs, so the
    # replica stays provisioning well past --timeout (the engine's own TLS timeout is 10s).
    registry = socket.socket()
    try:
        registry.bind(("127.0.0.1", 0))
        registry.listen(16)
        port = registry.getsockname()[1]
        path = write_service(tmp_path, "stalled", f"127.0.0.1:{port}/dstackctl-never:latest", [HTTPD])

        result = dstackctl("run", "-d", "--timeout", "1s", path)

        assert result.returncode == 3, result.stderr
        assert "stalled was not ready within 1s" in result.stderr
        # The pull must still hang, so wait less than the engine's TLS timeout.
        [replica] = wait_until(
            lambda: [
                r
                for r in _run(dstackctl("ps", "--json", "stalled"))["replicas"]
                if (r["message"] or "").startswith(f"pulling 127.0.0.1:{port}/")
            ],
            timeout=8,
            what="stalled's replica to show that it is pulling",
        )
        assert replica["status"] == "provisioning"
        shown = _run(dstackctl("ps", "--json", "stalled"))
        assert (shown["status"], shown["agent_alive"]) == ("provisioning", True)
        # While the image is pulled the endpoint answers (after its start-up grace), not hangs.
        answer = requests.get(shown["url"], timeout=10)
        assert (answer.status_code, answer.json()["error"]) == (503, "no replica is ready")
    finally:
        registry.close()  # the pull now fails at once, and the teardown's stop is quick


@pytest.mark.docker
def test_ps_exits_0_when_an_agent_is_dead_and_says_so(
    dstack_home: Path, tmp_path: Path, test_image: str
) -> None:
    path = write_service(tmp_path, "orphan", test_image, [HTTPD])
    assert dstackctl("run", "-d", "--timeout", "60s", path).returncode == 0
    kill_agent_and_supervisor(Store(dstack_home), "orphan")

    listed = dstackctl("ps")
    as_json = dstackctl("ps", "--json")

    assert listed.returncode == 0
    assert "the agent of orphan is not running" in listed.stderr
    assert "agent down" in listed.stdout
    assert as_json.returncode == 0
    assert "the agent of orphan is not running" in as_json.stderr
    [shown] = json.loads(as_json.stdout)["runs"]
    assert shown["agent_alive"] is False


@pytest.mark.docker
def test_the_console_script_forks_a_detached_agent_that_keeps_none_of_the_clis_files(
    dstack_home: Path, tmp_path: Path, test_image: str
) -> None:
    path = write_service(tmp_path, "forked", test_image, [HTTPD])
    # capture_output: had the agent kept the CLI's stdout or stderr pipe, this would hang.
    assert dstackctl("run", "-d", "--timeout", "60s", path).returncode == 0
    store = Store(dstack_home)
    pid = store.agent_holder("forked")
    assert pid is not None

    stat = Path(f"/proc/{pid}/stat").read_text()
    state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
    assert state != "Z"
    # A session of its own, whose leader (the first fork) has exited: the terminal's Ctrl-C
    # does not reach the agent, and it can never take a controlling terminal.
    assert int(session) != os.getsid(0)
    assert not Path(f"/proc/{session}").exists()
    log = str(store.log_path("forked"))
    assert os.readlink(f"/proc/{pid}/fd/1") == log
    assert os.readlink(f"/proc/{pid}/fd/2") == log
    assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
    written = Path(log).read_text()
    assert f"agent for forked started (pid {pid})" in written
    # Its supervisor was the one forked before the CLI imported anything (agent/warm_start.py).
    supervisor = store.agent_processes("forked")[-1]
    assert f"supervisor of forked started while the CLI checked the file (pid {supervisor})" in written

    assert dstackctl("stop", "forked").returncode == 0
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=15, what="the agent to exit")


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (zombies have none to read)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
    return found


@pytest.mark.parametrize("config", ["invalid", "no docker"])
def test_a_run_that_starts_no_agent_leaves_no_process_behind(
    dstack_home: Path, tmp_path: Path, config: str
) -> None:
    # `run` forks a warm supervisor first thing; when no agent is started it must exit.
    marker = f"DSTACKCTL_TEST_MARKER={uuid.uuid4().hex}"
    env = {"DSTACKCTL_TEST_MARKER": marker.partition("=")[2]}
    if config == "invalid":
        path = tmp_path / "broken.dstack.yml"
        path.write_text("type: service\nimage: busybox\nport: 8000\nreplicas: -1\n")
        expected = 2
    else:
        path = write_service(tmp_path, "nodocker", "dstackctl-testsrv:latest", [HTTPD])
        env["DOCKER_HOST"] = NO_DOCKER
        expected = 1

    assert dstackctl("run", "-d", path, env=env).returncode == expected
    wait_until(lambda: not _processes_with(marker), timeout=30, what="the warm supervisor to exit")
