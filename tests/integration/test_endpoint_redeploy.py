"""The service endpoint and rolling redeploys on the real engine (design.md sections 5 and 6).

Traffic goes through the endpoint URL that `ps --json` shows (`runs[0].url`): the agent's
reverse proxy on 127.0.0.1, which routes only to ready replicas. /cgi-bin/whoami answers
"$DSTACK_RUN_NAME $DSTACK_REPLICA_NUM $DEPLOYMENT_TAG", so each answer tells which replica
of which deployment served it. The CLI runs in-process; the agent is a real process.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from helpers import cli, ps_run, wait_until, write_service

from dstackctl.labels import home_label
from dstackctl.netutil import port_is_free

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HTTPD = "httpd -f -p 8000 -h /www"
WAIT = 30.0  # generous upper bound for anything the agent does on a 2-core machine
HEALTH = "probes:\n  - type: http\n    url: /cgi-bin/health\n    interval: 1s\n"


def container_ids(run_json: dict[str, Any]) -> dict[int, str]:
    return {r["replica_num"]: r["container_id"] for r in run_json["replicas"]}


def labelled(docker_client: Any, home: Path, name: str) -> list[Any]:
    """Every container (running or not) of service `name` in the store at `home`."""
    filters = {"label": [f"dstackctl.run={name}", f"dstackctl.home={home_label(home)}"]}
    return list(docker_client.containers.list(all=True, filters=filters))


def variant(path: Path, suffix: str, *replacements: tuple[str, str]) -> Path:
    """A copy of the service file `path` with text replaced (same name, same endpoint port)."""
    text = path.read_text()
    for old, new in replacements:
        assert old in text, f"{old!r} is not in {path.name}"
        text = text.replace(old, new)
    changed = path.with_name(f"{path.name.split('.')[0]}-{suffix}.dstack.yml")
    changed.write_text(text)
    return changed


@dataclass(frozen=True)
class Answer:
    started: float  # time.monotonic() when the request was sent
    status: int | None
    body: str
    error: str | None


class Load:
    """A client thread sending GET requests to `url` about `rate` times a second; with a
    `body`, POST requests to an echo URL, whose answer must carry the body back.

    It records every answer, or the exception, with the time the request was sent.
    """

    def __init__(self, url: str, rate: float = 15.0, body: str | None = None) -> None:
        self.url = url
        self.gap = 1.0 / rate
        self.body = body
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, name="load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _send(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    if self.body is None:
                        response = session.get(self.url, timeout=5)
                    else:
                        response = session.post(self.url, data=self.body, timeout=5)
                    answer = Answer(started, response.status_code, response.text, None)
                except requests.RequestException as exc:
                    answer = Answer(started, None, "", f"{type(exc).__name__}: {exc}")
                self.answers.append(answer)
                self._stop.wait(self.gap)

    def count_since(self, moment: float) -> int:
        return sum(1 for a in list(self.answers) if a.started >= moment)

    def failures(self) -> list[Answer]:
        echoed = None if self.body is None else f"POST\n{self.body}"
        return [
            a
            for a in self.answers
            if a.status != 200 or a.error is not None or (echoed is not None and a.body != echoed)
        ]


def test_redeploy_under_load_fails_no_request_and_ends_on_the_new_deployment(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = write_service(
        tmp_path, "rolling", test_image, [HTTPD], replicas=2, env=["DEPLOYMENT_TAG=v1"], extra=HEALTH
    )
    v2 = variant(v1, "v2", ("DEPLOYMENT_TAG=v1", "DEPLOYMENT_TAG=v2"))
    assert cli(capsys, "run", "-d", "--timeout", "60s", v1).code == 0
    before = ps_run(capsys, "rolling")
    old_ids = set(container_ids(before).values())

    with (
        Load(before["url"] + "/cgi-bin/whoami") as load,
        Load(before["url"] + "/cgi-bin/echo", rate=5, body="order=42&note=redeploy") as posts,
    ):
        wait_until(lambda: load.count_since(0) >= 10, timeout=WAIT, what="10 answers before the redeploy")
        redeploy_started = time.monotonic()
        result = cli(capsys, "redeploy", "rolling", "-f", v2, "--timeout", "60s")
        redeploy_done = time.monotonic()
        wait_until(
            lambda: load.count_since(redeploy_done) >= 20,
            timeout=WAIT,
            what="20 answers after the redeploy",
        )

    assert result.code == 0, result.err
    assert "rolling now runs deployment 1 (2 replicas)" in result.out
    assert load.failures() == [], f"{len(load.failures())} of {len(load.answers)} requests failed"
    assert posts.failures() == [], f"{len(posts.failures())} of {len(posts.answers)} POSTs failed"
    assert posts.count_since(redeploy_started) - posts.count_since(redeploy_done) >= 5
    during = [a.body for a in load.answers if redeploy_started <= a.started < redeploy_done]
    assert len(during) >= 20, f"only {len(during)} requests while the redeploy ran"
    assert {a.body for a in load.answers if a.started < redeploy_started} == {
        "rolling 0 v1\n",
        "rolling 1 v1\n",
    }
    assert {a.body for a in load.answers if a.started >= redeploy_done} == {
        "rolling 0 v2\n",
        "rolling 1 v2\n",
    }
    after = ps_run(capsys, "rolling")
    assert after["deployment_num"] == 1
    assert [(r["replica_num"], r["deployment_num"], r["ready"]) for r in after["replicas"]] == [
        (0, 1, True),
        (1, 1, True),
    ]
    assert not old_ids & set(container_ids(after).values()), "an old container is still listed"


def test_a_redeploy_whose_new_replica_never_passes_is_rolled_back_while_the_old_ones_serve(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = write_service(
        tmp_path, "steadfast", test_image, [HTTPD], replicas=2, env=["DEPLOYMENT_TAG=v1"], extra=HEALTH
    )
    broken = variant(
        v1,
        "broken",
        ("DEPLOYMENT_TAG=v1", "DEPLOYMENT_TAG=v2"),
        ("url: /cgi-bin/health", "url: /cgi-bin/missing"),  # busybox httpd: 404
    )
    assert cli(capsys, "run", "-d", "--timeout", "60s", v1).code == 0
    before = ps_run(capsys, "steadfast")

    with Load(before["url"] + "/cgi-bin/whoami") as load:
        wait_until(lambda: load.count_since(0) >= 10, timeout=WAIT, what="10 answers before the redeploy")
        redeploy_started = time.monotonic()
        result = cli(capsys, "redeploy", "steadfast", "-f", broken, "--timeout", "5s")
        redeploy_done = time.monotonic()
        wait_until(
            lambda: load.count_since(redeploy_done) >= 10,
            timeout=WAIT,
            what="10 answers after the redeploy",
        )

    assert result.code == 1, (result.out, result.err)
    error = result.err.splitlines()[-1]
    assert error.startswith(
        "error: the redeploy of steadfast failed and was rolled back to deployment 0: "
        "replica=0 (deployment 1) was not ready within 5s"
    ), result.err
    assert "probe /cgi-bin/missing 0/1 (HTTP 404)" in error
    assert load.failures() == [], f"{len(load.failures())} of {len(load.answers)} requests failed"
    assert any(redeploy_started <= a.started < redeploy_done for a in load.answers)
    assert {a.body for a in load.answers} == {"steadfast 0 v1\n", "steadfast 1 v1\n"}
    after = ps_run(capsys, "steadfast")
    assert after["deployment_num"] == 0
    assert after["rollout"]["state"] == "rolled_back"
    assert [(r["replica_num"], r["deployment_num"], r["ready"]) for r in after["replicas"]] == [
        (0, 0, True),
        (1, 0, True),
    ]
    assert container_ids(after) == container_ids(before), "the old replicas were replaced"
    assert sorted(c.id for c in labelled(docker_client, dstack_home, "steadfast")) == sorted(
        container_ids(before).values()
    ), "the new replica's container was not removed"
    table = cli(capsys, "ps", "-v", "steadfast")
    assert "steadfast deployment=0" in table.out
    assert "deployment=1" not in table.out


def test_a_stream_reaches_the_client_chunk_by_chunk_through_the_endpoint(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "streamer", test_image, [HTTPD], extra=HEALTH)
    assert cli(capsys, "run", "-d", "--timeout", "60s", path).code == 0
    endpoint = urlsplit(ps_run(capsys, "streamer")["url"])
    assert endpoint.hostname is not None and endpoint.port is not None

    # /cgi-bin/stream?3 prints 3 lines a second apart, each with the time it was produced
    # in seconds since boot (/proc/uptime, the host's CLOCK_BOOTTIME: containers share it).
    connection = http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=10)
    try:
        connection.request("GET", "/cgi-bin/stream?3")
        response = connection.getresponse()
        assert response.status == 200
        first = response.readline().decode()
        first_received = time.clock_gettime(time.CLOCK_BOOTTIME)
        rest = response.read().decode().splitlines()
    finally:
        connection.close()

    lines = [first.rstrip("\n"), *rest]
    assert [line.rsplit(" at ", 1)[0] for line in lines] == ["chunk 1 of 3", "chunk 2 of 3", "chunk 3 of 3"]
    last_produced = float(lines[-1].rsplit(" at ", 1)[1])
    # The last line is produced 2 s after the first; buffering would deliver them together.
    assert first_received < last_produced - 1.0, (
        f"the first chunk arrived at {first_received:.2f}, the last was produced at {last_produced:.2f}"
    )


def test_the_endpoint_answers_503_json_without_a_ready_replica_and_stop_frees_its_port(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    never = "probes:\n  - type: http\n    url: /cgi-bin/status?503\n    interval: 1s\n"
    path = write_service(tmp_path, "nobody", test_image, [HTTPD], extra=never)
    assert cli(capsys, "run", "--no-wait", path).code == 0

    def probed() -> dict[str, Any] | None:
        shown = ps_run(capsys, "nobody")
        rows = shown["replicas"]
        probes = rows[0]["probes"] if rows else []
        return shown if shown["url"] and probes and probes[0]["last_status"] == 503 else None

    shown = wait_until(probed, timeout=WAIT, what="nobody's probe to get its first 503")
    assert shown["replicas"][0]["ready"] is False
    url = shown["url"]
    port = urlsplit(url).port
    assert port is not None

    response = requests.get(url + "/cgi-bin/whoami", timeout=5)

    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Retry-After"] == "1"
    assert response.json() == {"error": "no replica is ready", "service": "nobody"}

    assert cli(capsys, "stop", "nobody").code == 0
    assert port_is_free("127.0.0.1", port), f"port {port} is still taken after stop"
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)


def test_a_redeploy_while_another_is_in_progress_is_refused(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = write_service(tmp_path, "busy", test_image, [HTTPD], env=["DEPLOYMENT_TAG=v1"], extra=HEALTH)
    v2 = variant(v1, "v2", ("DEPLOYMENT_TAG=v1", "DEPLOYMENT_TAG=v2"))
    broken = variant(v2, "broken", ("url: /cgi-bin/health", "url: /cgi-bin/missing"))
    assert cli(capsys, "run", "-d", "--timeout", "60s", v1).code == 0
    started = cli(capsys, "redeploy", "busy", "-f", broken, "--no-wait", "--timeout", "60s")
    assert started.code == 0, started.err
    assert ps_run(capsys, "busy")["rollout"]["state"] == "in_progress"

    again = cli(capsys, "redeploy", "busy")
    changed = cli(capsys, "run", "-d", "-y", v2)

    busy = "error: busy is already being redeployed (deployment 1, in progress)"
    assert again.code == 1
    assert again.err.startswith(busy), again.err
    assert changed.code == 1
    assert changed.err.startswith(busy), changed.err
    shown = ps_run(capsys, "busy")
    assert (shown["deployment_num"], shown["rollout"]["state"]) == (1, "in_progress")
    old = [r for r in shown["replicas"] if r["deployment_num"] == 0]
    assert [(r["replica_num"], r["ready"]) for r in old] == [(0, True)], "the old replica stopped serving"
    assert requests.get(shown["url"] + "/cgi-bin/whoami", timeout=5).text == "busy 0 v1\n"


def test_a_redeploy_of_a_service_with_no_ready_replica_still_ends_at_its_deadline(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No old replica serves, so nothing rolls one by one; the new replica must still be
    # ready within --timeout, and the rollout must end (else no later redeploy is accepted).
    never = "probes:\n  - type: http\n    url: /cgi-bin/status?503\n    interval: 1s\n"
    path = write_service(tmp_path, "hopeless", test_image, [HTTPD], extra=never)
    assert cli(capsys, "run", "--no-wait", path).code == 0
    wait_until(
        lambda: [r for r in ps_run(capsys, "hopeless")["replicas"] if r["status"] == "running"],
        timeout=WAIT,
        what="hopeless's replica to run",
    )

    result = cli(capsys, "redeploy", "hopeless", "--timeout", "4s")

    assert result.code == 1, (result.out, result.err)
    error = result.err.splitlines()[-1]
    assert "still in progress" not in error, error
    assert "(deployment 1) was not ready within 4s: probe /cgi-bin/status?503 0/1 (HTTP 503)" in error
    shown = ps_run(capsys, "hopeless")
    assert shown["deployment_num"] == 0
    assert shown["rollout"]["state"] not in ("in_progress", "rolling_back"), shown["rollout"]
    assert [r["deployment_num"] for r in shown["replicas"]] == [0]
    # Nothing is left in progress: the next redeploy is accepted.
    assert cli(capsys, "redeploy", "hopeless", "--no-wait").code == 0


def test_scale_in_place_then_restart_then_a_changed_config_through_run(
    dstack_home: Path, tmp_path: Path, test_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = write_service(tmp_path, "elastic", test_image, [HTTPD], env=["DEPLOYMENT_TAG=v1"], extra=HEALTH)
    scaled = variant(v1, "scaled", ("replicas: 1", "replicas: 2"))
    v2 = variant(scaled, "v2", ("DEPLOYMENT_TAG=v1", "DEPLOYMENT_TAG=v2"))
    assert cli(capsys, "run", "-d", "--timeout", "60s", v1).code == 0
    first = container_ids(ps_run(capsys, "elastic"))

    # `replicas` alone: scaled in place, same deployment, replica 0 untouched.
    result = cli(capsys, "redeploy", "elastic", "-f", scaled, "--timeout", "60s")
    assert result.code == 0, result.err
    assert "elastic: scaling to 2 replicas in place." in result.err
    shown = ps_run(capsys, "elastic")
    assert shown["deployment_num"] == 0
    assert [(r["replica_num"], r["deployment_num"], r["ready"]) for r in shown["replicas"]] == [
        (0, 0, True),
        (1, 0, True),
    ]
    scaled_ids = container_ids(shown)
    assert scaled_ids[0] == first[0]

    # `redeploy` without -f: every replica restarts, deployment + 1.
    result = cli(capsys, "redeploy", "elastic", "--timeout", "60s")
    assert result.code == 0, result.err
    assert "elastic: rolling update to deployment 1." in result.err
    shown = ps_run(capsys, "elastic")
    assert shown["deployment_num"] == 1
    assert [(r["replica_num"], r["deployment_num"], r["ready"]) for r in shown["replicas"]] == [
        (0, 1, True),
        (1, 1, True),
    ]
    restarted_ids = container_ids(shown)
    assert not set(restarted_ids.values()) & set(scaled_ids.values()), "a replica was not restarted"

    # `run -y` of the running service with a changed config: the same rolling update.
    result = cli(capsys, "run", "-d", "-y", "--timeout", "60s", v2)
    assert result.code == 0, result.err
    assert "elastic: rolling update to deployment 2." in result.err
    assert "elastic now runs deployment 2 (2 replicas)" in result.out
    shown = ps_run(capsys, "elastic")
    assert shown["deployment_num"] == 2
    assert [(r["replica_num"], r["deployment_num"], r["ready"]) for r in shown["replicas"]] == [
        (0, 2, True),
        (1, 2, True),
    ]
    assert not set(container_ids(shown).values()) & set(restarted_ids.values())
    bodies = {requests.get(shown["url"] + "/cgi-bin/whoami", timeout=5).text for _ in range(6)}
    assert bodies == {"elastic 0 v2\n", "elastic 1 v2\n"}
