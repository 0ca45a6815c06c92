"""Hardening on the real engine: a killed agent mid-rollout, replicas that die, run out of
memory or hang, broken store files, and secrets and sockets that must not leak.

The CLI runs in-process (`dstackctl.cli.main.run`); the agent is a real detached process and
the containers are real. Each test has its own ``$DSTACKCTL_HOME`` (fixture ``dstack_home``),
whose teardown stops the agents and removes every container carrying that home's label.
/cgi-bin/whoami answers "$DSTACK_RUN_NAME $DSTACK_REPLICA_NUM $DEPLOYMENT_TAG", so each
answer tells which replica of which deployment served it. bench/crash_trials.py runs the
agent-crash trial of this file many times over.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import requests
from helpers import Result, cli, kill_agent_and_supervisor, ps_run, wait_until, write_service

from dstackctl.labels import home_label
from dstackctl.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HTTPD = "httpd -f -p 8000 -h /www"
WAIT = 30.0  # generous upper bound for anything the agent does on a 2-core machine
HTTP_TIMEOUT = 5.0


def rows(capsys: pytest.CaptureFixture[str], name: str) -> dict[int, dict[str, Any]]:
    """The replicas of `name` by replica number (the newest deployment's row when several)."""
    found: dict[int, dict[str, Any]] = {}
    for row in ps_run(capsys, name)["replicas"]:
        if (
            row["replica_num"] not in found
            or row["deployment_num"] > found[row["replica_num"]]["deployment_num"]
        ):
            found[row["replica_num"]] = row
    return found


def home_containers(docker_client: Any, home: Path) -> list[Any]:
    """Every container (any state) of the store at `home`."""
    return list(
        docker_client.containers.list(all=True, filters={"label": f"dstackctl.home={home_label(home)}"})
    )


def answer(url: str) -> tuple[int, str] | None:
    """(status, body) of a GET, or None when nothing answers."""
    try:
        response = requests.get(url, timeout=HTTP_TIMEOUT)
    except requests.RequestException:
        return None
    return response.status_code, response.text


def start(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    result = cli(capsys, "run", "-d", "--timeout", "60s", path)
    assert result.code == 0, result.err
    return ps_run(capsys, path.name.split(".")[0])


# --- 1. the agent killed at moments of a rolling redeploy ----------------------------------

HEALTH = "probes:\n  - type: http\n    url: /cgi-bin/health\n    interval: 1s\n"


@dataclass
class Sampler:
    """Calls `sample` every 50 ms from a thread and keeps (monotonic time, value)."""

    sample: Callable[[], Any]
    seen: list[tuple[float, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.seen.append((time.monotonic(), self.sample()))


@contextmanager
def sampling(*samples: Callable[[], Any]) -> Iterator[list[Sampler]]:
    samplers = [Sampler(sample) for sample in samples]
    threads = [threading.Thread(target=s.run, daemon=True) for s in samplers]
    for thread in threads:
        thread.start()
    try:
        yield samplers
    finally:
        for sampler in samplers:
            sampler.stop.set()
        for thread in threads:
            thread.join(HTTP_TIMEOUT + 1)


def failures_after_first_success(answers: list[tuple[float, Any]]) -> list[tuple[float, Any]]:
    """The answers that were not a 200 once the endpoint had answered 200."""
    first = next((i for i, (_, got) in enumerate(answers) if got and got[0] == 200), None)
    assert first is not None, "the endpoint never answered 200"
    return [(at, got) for at, got in answers[first:] if not (got and got[0] == 200)]


def deployments(docker_client: Any, home: Path) -> list[tuple[int, int, str]]:
    """(deployment, replica, state) of every container of the home, from one list call (the
    agent may remove a container between a list and an inspect)."""
    found = docker_client.api.containers(all=True, filters={"label": f"dstackctl.home={home_label(home)}"})
    return sorted(
        (int(c["Labels"]["dstackctl.deployment"]), int(c["Labels"]["dstackctl.replica"]), c["State"])
        for c in found
    )


KILL_MOMENTS: dict[str, Callable[[list[tuple[int, int, str]], int], bool]] = {
    # The first replica of the new deployment exists (it is starting, or just started).
    "first-new-replica": lambda found, n: any(d == 1 for d, _, _ in found),
    # An old replica was stopped: the rollout is half-way.
    "half-way": lambda found, n: sum(1 for d, _, s in found if d == 0 and s == "running") < n,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("moment", "next_command"),
    [("first-new-replica", "redeploy"), ("half-way", "run")],
)
def test_the_agent_killed_during_a_rolling_redeploy_finishes_it_when_restarted(
    dstack_home: Path,
    tmp_path: Path,
    test_image: str,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
    moment: str,
    next_command: str,
) -> None:
    n = 2
    v1 = write_service(
        tmp_path, "crashy", test_image, [HTTPD], replicas=n, env=["DEPLOYMENT_TAG=v1"], extra=HEALTH
    )
    (tmp_path / "v2").mkdir()
    v2 = tmp_path / "v2" / v1.name
    v2.write_text(v1.read_text().replace("DEPLOYMENT_TAG=v1", "DEPLOYMENT_TAG=v2"))
    url = start(capsys, v1)["url"]
    store = Store(dstack_home)
    old_pid = store.agent_holder("crashy")
    assert old_pid is not None

    assert cli(capsys, "redeploy", "crashy", "-f", v2, "--no-wait").code == 0
    wait_until(
        lambda: KILL_MOMENTS[moment](deployments(docker_client, dstack_home), n),
        timeout=WAIT,
        what=f"the rollout to reach the moment {moment}",
        interval=0.02,
    )
    kill_agent_and_supervisor(store, "crashy")  # the supervisor too: a user's command restarts it
    killed_at = time.monotonic()

    # While the agent is down, ps says so, and the endpoint (which lives in the agent) is down.
    down = cli(capsys, "ps", "--json", "crashy")
    assert down.code == 0
    assert json.loads(down.out)["runs"][0]["agent_alive"] is False
    assert "the agent of crashy is not running, so its endpoint is down" in down.err
    assert answer(f"{url}/cgi-bin/whoami") is None
    # The rollout's outcome is observed state: the agent's, in state.json.
    rollout = (store.read("crashy", "state") or {})["rollout"]
    assert rollout["state"] == "in_progress", "the kill should have come before the rollout ended"

    watcher = docker.from_env(timeout=30)  # a client of its own for the sampling thread
    with sampling(lambda: answer(f"{url}/cgi-bin/whoami"), lambda: deployments(watcher, dstack_home)) as (
        load,
        containers,
    ):
        if next_command == "redeploy":
            result = cli(capsys, "redeploy", "crashy")
            assert result.code == 1
            assert (
                "its agent was not running; restarted it, and it carries on with that rollout" in result.err
            )
        else:
            result = cli(capsys, "run", "-d", "--timeout", "60s", v2)
            assert result.code == 0, result.err
            assert "the agent of crashy was not running; restarted it" in result.err

        def finished() -> dict[str, Any] | None:
            state = store.read("crashy", "state") or {}
            shown = ps_run(capsys, "crashy")
            settled = len(shown["replicas"]) == n and all(r["ready"] for r in shown["replicas"])
            done = (state.get("rollout") or {}).get("state") in ("done", "rolled_back")
            return shown if done and settled else None

        shown = wait_until(finished, timeout=60, what="the restarted agent to finish the rollout")
        recovered_in = time.monotonic() - killed_at
        bodies = {answer(f"{url}/cgi-bin/whoami") for _ in range(3 * n)}

    state = store.read("crashy", "state") or {}
    assert state["rollout"]["state"] == "done", state["rollout"]
    assert state["deployment_num"] == 1
    # Exactly N containers, all of the new deployment, each replica number once, all running.
    assert deployments(docker_client, dstack_home) == [(1, num, "running") for num in range(n)]
    # ps is truthful: a live agent, and the very containers Docker has.
    assert shown["agent_alive"] is True
    assert store.agent_holder("crashy") not in (None, old_pid)
    assert sorted(r["container_id"] for r in shown["replicas"]) == sorted(
        c.id for c in home_containers(docker_client, dstack_home)
    )
    assert [(r["replica_num"], r["deployment_num"], r["status"]) for r in shown["replicas"]] == [
        (num, 1, "running") for num in range(n)
    ]
    # The endpoint is back and serves the new deployment only.
    assert bodies == {(200, f"crashy {num} v2\n") for num in range(n)}
    # The restarted agent removed no old replica before a new one was ready to take its place
    # (it drains them in turn, as a live agent does): N replicas kept running all along.
    fewest = min(sum(1 for _, _, state in found if state == "running") for _, found in containers.seen)
    assert fewest >= n, f"only {fewest} of {n} replicas were running at one point of the recovery"
    # And once back, the endpoint failed no request.
    assert failures_after_first_success(load.seen) == []
    watcher.close()
    assert recovered_in < 60


# --- 3. replicas that die, run out of memory, or hang ----------------------------------------

INTERVAL = 2  # seconds between probes
TIMEOUT = 1  # probe timeout
# Docker reports an exit within milliseconds; the bound that a test can hold on a loaded 2-core
# machine adds two intervals for the agent's poll and publish and for each `ps`: an agent that
# waited for its probes instead of Docker's events would still be several intervals late.
SHOWN_WITHIN = INTERVAL + 2 * INTERVAL
# httpd runs in the background; the shell waits for /tmp/oom, then fills its 64 MB.
FAULTY = [
    "httpd -p 8000 -h /www",
    "while [ ! -e /tmp/oom ]; do sleep 0.2; done",
    "head -c 300m /dev/zero | tail",
]
FAULT_EXTRA = (
    'resources:\n  memory: "..64MB"\n'
    "probes:\n  - type: http\n    url: /cgi-bin/health\n"
    f"    interval: {INTERVAL}s\n    timeout: {TIMEOUT}s\n"
)
RETRY = "retry:\n  on_events: [error]\n  duration: 10m\n"


def container_of(docker_client: Any, home: Path, name: str, num: int) -> Any:
    filters = {
        "label": [f"dstackctl.home={home_label(home)}", f"dstackctl.run={name}", f"dstackctl.replica={num}"]
    }
    [container] = docker_client.containers.list(filters=filters)
    return container


def until_seen(
    capsys: pytest.CaptureFixture[str],
    name: str,
    num: int,
    seen: Callable[[dict[str, Any]], bool],
    what: str,
    since: float,
) -> tuple[dict[str, Any], float]:
    """The row of replica `num` once `seen` holds for it, and the seconds since `since`."""
    row = wait_until(
        lambda: (lambda r: r if seen(r) else None)(rows(capsys, name)[num]),
        timeout=WAIT,
        what=what,
        interval=0.05,
    )
    return row, time.monotonic() - since


def served_by(url: str, requests_count: int = 8) -> set[str]:
    """The bodies of several answers of the endpoint; every one must be a 200."""
    found = set()
    for _ in range(requests_count):
        got = answer(url)
        assert got is not None and got[0] == 200, got
        found.add(got[1])
    return found


@pytest.mark.slow
def test_a_killed_and_an_out_of_memory_replica_leave_the_endpoint_and_stay_failed_without_retry(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "fragile", test_image, FAULTY, replicas=3, extra=FAULT_EXTRA)
    url = start(capsys, path)["url"]
    killed = container_of(docker_client, dstack_home, "fragile", 0)
    starved = container_of(docker_client, dstack_home, "fragile", 1)

    killed.kill()  # SIGKILL
    row0, took0 = until_seen(
        capsys, "fragile", 0, lambda r: r["status"] == "failed", "replica 0 to show failed", time.monotonic()
    )
    starved.exec_run(["touch", "/tmp/oom"])
    row1, took1 = until_seen(
        capsys, "fragile", 1, lambda r: r["status"] == "failed", "replica 1 to show failed", time.monotonic()
    )

    assert took0 <= SHOWN_WITHIN, f"the killed replica showed in ps after {took0:.1f}s"
    assert took1 <= SHOWN_WITHIN, f"the replica out of memory showed in ps after {took1:.1f}s"
    assert (row0["exit_code"], row0["message"], row0["ready"]) == (137, "exited with code 137", False)
    assert (row1["exit_code"], row1["message"], row1["ready"]) == (
        137,
        "ran out of memory (OOM killed)",
        False,
    )
    assert served_by(f"{url}/cgi-bin/whoami") == {"fragile 2 \n"}
    # Without `retry` they stay failed: the agent has looked again (a fresh heartbeat) and
    # neither was replaced nor restarted.
    store = Store(dstack_home)
    beat = (store.read("fragile", "state") or {})["agent"]["heartbeat_at"]
    wait_until(
        lambda: (store.read("fragile", "state") or {})["agent"]["heartbeat_at"] != beat,
        timeout=WAIT,
        what="the agent to publish its state again",
    )
    again = rows(capsys, "fragile")
    assert [(again[i]["container_id"], again[i]["status"]) for i in (0, 1)] == [
        (killed.id, "failed"),
        (starved.id, "failed"),
    ]
    assert sorted(c.status for c in home_containers(docker_client, dstack_home)) == [
        "exited",
        "exited",
        "running",
    ]
    table = cli(capsys, "ps", "-v", "fragile").out
    assert "failed (exit 137)" in table
    assert "ran out of memory (OOM killed)" in table


@pytest.mark.slow
def test_a_killed_and_an_out_of_memory_replica_are_replaced_under_retry(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "phoenix", test_image, FAULTY, replicas=3, extra=FAULT_EXTRA + RETRY)
    url = start(capsys, path)["url"]
    killed = container_of(docker_client, dstack_home, "phoenix", 0)
    starved = container_of(docker_client, dstack_home, "phoenix", 1)

    def gone(container: Any) -> Callable[[dict[str, Any]], bool]:
        return lambda r: r["container_id"] != container.id or not r["ready"]

    killed.kill()
    _, took0 = until_seen(capsys, "phoenix", 0, gone(killed), "replica 0 to leave rotation", time.monotonic())
    starved.exec_run(["touch", "/tmp/oom"])
    _, took1 = until_seen(
        capsys, "phoenix", 1, gone(starved), "replica 1 to leave rotation", time.monotonic()
    )
    assert took0 <= SHOWN_WITHIN, f"the killed replica showed in ps after {took0:.1f}s"
    assert took1 <= SHOWN_WITHIN, f"the replica out of memory showed in ps after {took1:.1f}s"

    def replaced(container: Any, last: str) -> Callable[[dict[str, Any]], bool]:
        message = f"replaced 1 time (last: {last})"
        return lambda r: r["container_id"] != container.id and r["ready"] and r["message"] == message

    now = time.monotonic()
    until_seen(
        capsys, "phoenix", 0, replaced(killed, "exited with code 137"), "replica 0 to be replaced", now
    )
    until_seen(capsys, "phoenix", 1, replaced(starved, "ran out of memory"), "replica 1 to be replaced", now)
    shown = ps_run(capsys, "phoenix")
    assert [(r["replica_num"], r["status"], r["ready"]) for r in shown["replicas"]] == [
        (num, "running", True) for num in range(3)
    ]
    assert sorted(r["container_id"] for r in shown["replicas"]) == sorted(
        c.id for c in home_containers(docker_client, dstack_home)
    )
    assert served_by(f"{url}/cgi-bin/whoami", 12) == {f"phoenix {num} \n" for num in range(3)}


@pytest.mark.slow
def test_a_hung_replica_shows_at_once_leaves_the_endpoint_and_is_replaced_per_retry(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "stuck", test_image, FAULTY, replicas=2, extra=FAULT_EXTRA + RETRY)
    url = start(capsys, path)["url"]
    hung = container_of(docker_client, dstack_home, "stuck", 0)

    hung.pause()  # the processes stop; Docker keeps the container, its port still accepts
    paused_at = time.monotonic()
    try:
        row, shown_after = until_seen(
            capsys,
            "stuck",
            0,
            lambda r: "paused" in (r["message"] or ""),
            "replica 0 to show it is paused",
            paused_at,
        )
        assert row["status"] == "running"
        probed, failed_after = until_seen(
            capsys,
            "stuck",
            0,
            lambda r: r["probes"][0]["symbol"] == "×",
            "replica 0's probe to fail",
            paused_at,
        )
        assert probed["probes"][0]["last_error"] == f"timed out after {TIMEOUT}s"
        assert probed["ready"] is True, "one failure must not take a ready replica out of rotation"
        out_row, out_after = until_seen(
            capsys, "stuck", 0, lambda r: not r["ready"], "replica 0 to leave rotation", paused_at
        )
        # ps shows the pause at once (Docker knows of it), × after the first failed probe, and
        # the replica leaves rotation after three failures in a row (design section 3): each
        # probe starts at most one interval after the last one ended and fails after its timeout.
        # First as an order, which load does not change: the pause showed before a second probe
        # failed, × with the first failure and the exit from rotation with the third (the next
        # failure is INTERVAL + TIMEOUT away, ample time for ps to see each).
        streaks = [r["probes"][0]["failure_streak"] for r in (row, probed, out_row)]
        assert streaks[0] <= 1, f"the pause showed in ps only after {streaks[0]} failed probes"
        assert streaks[1:] == [1, 3], f"× and the exit from rotation showed at failures {streaks[1:]}"
        # Then in seconds, with two intervals of slack for a loaded 2-core machine (the agent's
        # Docker poll and publish, each ps): an agent several intervals late still fails.
        slack = SHOWN_WITHIN - INTERVAL
        assert shown_after <= SHOWN_WITHIN, f"the pause showed in ps after {shown_after:.1f}s"
        assert failed_after <= INTERVAL + TIMEOUT + slack, f"× showed after {failed_after:.1f}s"
        assert out_after <= 3 * (INTERVAL + TIMEOUT) + slack, (
            f"the replica left rotation after {out_after:.1f}s"
        )
        assert served_by(f"{url}/cgi-bin/whoami") == {"stuck 1 \n"}
        # With retry covering `error`, a replica that keeps failing (twice the failures that
        # took it out of rotation) is replaced like one that exited.
        replaced_row, _ = until_seen(
            capsys,
            "stuck",
            0,
            lambda r: r["ready"] and "stopped answering its probes" in (r["message"] or ""),
            "replica 0 to be replaced",
            paused_at,
        )
        assert replaced_row["container_id"] != hung.id
        assert replaced_row["message"] == "replaced 1 time (last: stopped answering its probes)"
    finally:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            hung.unpause()
    assert served_by(f"{url}/cgi-bin/whoami", 12) == {"stuck 0 \n", "stuck 1 \n"}


# --- 4. a corrupt or foreign store file -------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "content", "fragment"),
    [
        ("spec", b'{"version": 1, "name": "rotten", "desi', "is corrupt (not JSON)"),
        ("spec", b'{"version": 99, "name": "rotten"}', "has schema version 99"),
        ("state", b"\x00\xffnot json", "is corrupt (not JSON)"),
    ],
    ids=["spec-truncated", "spec-foreign", "state-binary"],
)
def test_a_broken_store_file_gets_one_sentence_and_stop_still_works(
    dstack_home: Path,
    tmp_path: Path,
    test_image: str,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    content: bytes,
    fragment: str,
) -> None:
    path = write_service(tmp_path, "rotten", test_image, [HTTPD])
    start(capsys, path)
    store = Store(dstack_home)
    broken = store.service_dir("rotten") / f"{kind}.json"
    if kind == "state":  # the agent rewrites state.json: it must not find out before ps does
        kill_agent_and_supervisor(store, "rotten")
    broken.write_bytes(content)

    commands = [["ps", "rotten"], ["ps", "-v", "--json", "rotten"]]
    if kind == "spec":  # (with state.json broken, `run` restarts the agent, which rewrites it)
        commands.append(["run", "-d", "--timeout", "60s", str(path)])
    for args in commands:
        result = cli(capsys, *args)
        assert result.code == 1, f"{args}: exit {result.code}"
        assert result.err.startswith(f"error: the state file {broken} "), result.err
        assert fragment in result.err
        assert "`dstackctl recover rotten`" in result.err
        assert "unexpected" not in result.err
        assert result.err.count("\n") == 1, result.err
    assert len(home_containers(docker_client, dstack_home)) == 1  # run started nothing more

    result = cli(capsys, "stop", "rotten")

    assert result.code == 0, result.err
    assert "Stopped rotten (1 container removed)." in result.out
    wait_until(lambda: not store.agent_alive("rotten"), timeout=10, what="the agent to exit")
    assert home_containers(docker_client, dstack_home) == []


# --- 7. secrets and exposure ---------------------------------------------------------------


def secrets_absent(texts: dict[str, str], secrets: list[str]) -> None:
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{where} shows a secret value"


def test_secrets_stay_out_of_debug_output_errors_labels_and_the_agent_log(
    dstack_home: Path,
    tmp_path: Path,
    test_image: str,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    file_secret = f"hunter2-{uuid.uuid4().hex}"
    cli_secret = f"swordfish-{uuid.uuid4().hex}"
    # A URL token with a space and a header value with a line break: an HTTP client refuses
    # both and quotes the value in its error (http.client did); /cgi-bin/auth refuses the
    # key, so the probes fail, and their errors must name the problem, never the value.
    url_token = f"tok en-{uuid.uuid4().hex}"
    header_secret = f"key-{uuid.uuid4().hex}\nX-Injected: {uuid.uuid4().hex}"
    probes = (
        "probes:\n"
        "  - type: http\n"
        "    url: /cgi-bin/auth?token=${{ env.URL_TOKEN }}\n"
        "    interval: 1s\n"
        "  - type: http\n"
        "    url: /cgi-bin/auth\n"
        "    headers:\n"
        "      - name: X-API-Key\n"
        "        value: ${{ env.PROBES_API_KEY }}\n"
        "    interval: 1s\n"
    )
    exiting = write_service(
        tmp_path,
        "blabber",
        test_image,
        ['echo "token=$SECRET_TOKEN cli=$CLI_TOKEN"', "exit 3"],
        env=[f"SECRET_TOKEN={file_secret}"],
    )
    unready = write_service(
        tmp_path,
        "hush",
        test_image,
        [HTTPD],
        env=[f"SECRET_TOKEN={file_secret}", "URL_TOKEN", f"PROBES_API_KEY={header_secret}"],
        extra=probes,
    )
    monkeypatch.setenv("URL_TOKEN", url_token)
    secrets = [file_secret, cli_secret, url_token, header_secret, header_secret.split("\n")[0]]
    shown: dict[str, str] = {}

    def keep(label: str, result: Result) -> Result:
        shown[label] = result.out + result.err
        return result

    failed = keep(
        "run of a failing replica",
        cli(capsys, "--debug", "run", "-d", "-e", f"CLI_TOKEN={cli_secret}", exiting),
    )
    assert failed.code == 1
    assert "replica=0 failed: exited with code 3; last log lines:" in failed.err
    assert "token=*** cli=***" in failed.err
    timed_out = keep("run that times out", cli(capsys, "--debug", "run", "-d", "--timeout", "6s", unready))
    assert timed_out.code == 3, timed_out.err
    assert "/cgi-bin/auth 0/1 (HTTP 401)" in timed_out.err
    bad_env = keep("a bad -e", cli(capsys, "--debug", "run", "-d", "-e", f"1BAD={cli_secret}", exiting))
    assert (bad_env.code, bad_env.err) == (
        2,
        "error: -e '1BAD': expected KEY=VALUE or KEY with a valid variable name\n",
    )
    for args in (
        ["ps", "--json"],
        ["ps", "-a", "-v", "--wide"],
        ["ps", "-v", "--json", "hush"],
        ["ps", "--wide", "blabber"],
    ):
        assert keep(" ".join(args), cli(capsys, "--debug", *args)).code == 0
    [hush] = ps_run(capsys, "hush")["replicas"]
    assert [p["last_error"] for p in hush["probes"]] == ["HTTP 401"] * 2
    # The installed entry point, whose `ps` takes a fast path of its own.
    entry = Path(sys.executable).parent / "dstackctl"
    for args in (["ps", "--json"], ["ps", "-a", "-v", "--wide"], ["--debug", "ps", "-v", "hush"]):
        done = subprocess.run([entry, *args], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        shown[f"entry point {' '.join(args)}"] = done.stdout + done.stderr
    assert [p["url"] for p in hush["probes"]] == ["/cgi-bin/auth?token=${{ env.URL_TOKEN }}", "/cgi-bin/auth"]

    store = Store(dstack_home)
    for name in ("blabber", "hush"):
        shown[f"{name}'s agent.log"] = store.log_path(name).read_text()
        for file in ("spec.json", "state.json"):
            shown[f"{name}'s {file}"] = (store.service_dir(name) / file).read_text()
    for container in home_containers(docker_client, dstack_home):
        shown[f"labels of {container.name}"] = json.dumps(container.labels)
    secrets_absent(shown, secrets)
    # Where the agent keeps the values to recreate replicas: secrets.json, and nowhere else.
    assert url_token in (store.service_dir("hush") / "secrets.json").read_text()
    assert cli_secret in (store.service_dir("blabber") / "secrets.json").read_text()

    # ps never even reads that file.
    original = Store.read

    def read_but_not_secrets(self: Store, name: str, kind: str) -> dict[str, Any] | None:
        assert kind != "secrets", "ps read secrets.json"
        return original(self, name, kind)

    monkeypatch.setattr(Store, "read", read_but_not_secrets)
    for args in (["ps", "--json"], ["ps", "-a", "-v", "--wide"], ["ps", "hush"]):
        assert cli(capsys, *args).code == 0


def listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} shows them) of sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(address)
    return found


LOOPBACK = "0100007F"  # 127.0.0.1 in /proc/net/tcp's byte order


def test_the_endpoint_and_replica_ports_listen_on_loopback_and_the_store_is_private(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "private", test_image, [HTTPD], replicas=2, extra=HEALTH)
    shown = start(capsys, path)
    endpoint_port = int(shown["url"].rsplit(":", 1)[1])

    assert shown["url"].startswith("http://127.0.0.1:")
    assert listening(endpoint_port) == [LOOPBACK]
    for container in home_containers(docker_client, dstack_home):
        bindings = container.attrs["HostConfig"]["PortBindings"]
        published = container.attrs["NetworkSettings"]["Ports"]
        assert {b["HostIp"] for bs in bindings.values() for b in bs} == {"127.0.0.1"}, bindings
        assert {b["HostIp"] for bs in published.values() for b in bs or []} == {"127.0.0.1"}, published
        port = int(next(iter(published.values()))[0]["HostPort"])
        assert set(listening(port)) <= {LOOPBACK}, f"replica port {port} listens beyond 127.0.0.1"

    # A rollout and a stop touch every kind of file the store has; all stay private.
    assert cli(capsys, "redeploy", "private", "--timeout", "60s").code == 0
    check_private(dstack_home)
    assert cli(capsys, "stop", "private").code == 0
    names = check_private(dstack_home)
    assert {"lock", "agent.lock", "agent.log", "spec.json", "state.json", "secrets.json"} <= names


def check_private(home: Path) -> set[str]:
    """Every folder under `home` (itself included) is 0700 and every file 0600; returns file names."""
    files = set()
    for folder, subfolders, names in os.walk(home):
        for sub in [folder, *(os.path.join(folder, s) for s in subfolders)]:
            assert stat.S_IMODE(os.stat(sub).st_mode) == 0o700, f"{sub} is not 0700"
        for name in names:
            mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
            assert mode == 0o600, f"{os.path.join(folder, name)} is {mode:o}, not 0600"
            files.add(name)
    return files


def test_env_values_outlive_a_rollout_for_the_replicas_created_after_it(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The agent keeps the values in secrets.json to create replicas later (a restart by
    # `redeploy`, a replacement under `retry`, a scale-up): a finished rollout must leave them.
    v1 = write_service(tmp_path, "keeper", test_image, [HTTPD], env=["DEPLOYMENT_TAG=v1"], extra=HEALTH)
    (tmp_path / "v2").mkdir()
    v2 = tmp_path / "v2" / v1.name
    v2.write_text(v1.read_text().replace("DEPLOYMENT_TAG=v1", "DEPLOYMENT_TAG=v2"))
    url = start(capsys, v1)["url"]
    assert cli(capsys, "redeploy", "keeper", "-f", v2, "--timeout", "60s").code == 0
    secrets = json.loads((Store(dstack_home).service_dir("keeper") / "secrets.json").read_text())
    assert secrets["env"] == {"DEPLOYMENT_TAG": "v2"}
    assert "previous_env" not in secrets

    result = cli(capsys, "redeploy", "keeper", "--timeout", "60s")  # restart: new containers

    assert result.code == 0, result.err
    assert answer(f"{url}/cgi-bin/whoami") == (200, "keeper 0 v2\n")
