"""A replica that hangs (`docker pause`) under client load: the endpoint suspects it from its
silence, the agent's probe confirms it, and it leaves the endpoint before three scheduled
probes have failed; the GETs that waited on it are answered by the other replica."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import cli, ps_run, wait_until, write_service

from dstackctl.store import Store

# Three failed probes take ~3 x (5 s + 2 s); suspicion (5 s) plus one probe (2 s) is far less.
PROBES = "probes:\n  - {type: http, url: /cgi-bin/health, interval: 5s, timeout: 2s}\n"
WAIT = 60.0


def test_a_paused_replica_leaves_the_endpoint_before_its_probes_fail_three_times(
    dstack_home: Path, tmp_path: Path, test_image: str, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_service(tmp_path, "sleeper", test_image, ["exec httpd -f -p 8000 -h /www"], 2, extra=PROBES)
    assert cli(capsys, "run", "-d", "--timeout", "60s", str(path)).code == 0
    shown = ps_run(capsys, "sleeper")
    url = str(shown["url"])
    paused = docker_client.containers.get(shown["replicas"][0]["container_id"])
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            began = time.monotonic()
            try:
                status = session.get(f"{url}/cgi-bin/whoami", timeout=WAIT).status_code
                (latencies if status == 200 else failures).append(time.monotonic() - began)
            except requests.RequestException as exc:
                failures.append(type(exc).__name__)  # type: ignore[arg-type]

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    log = Store(dstack_home).log_path("sleeper")
    try:
        wait_until(lambda: len(latencies) > 20, timeout=WAIT, what="steady answers")
        paused.pause()
        wait_until(
            lambda: "out of rotation: requests waited on it" in log.read_text(),
            timeout=WAIT,
            what="the endpoint to eject the paused replica",
        )
        row = ps_run(capsys, "sleeper")["replicas"][0]
        answered = len(latencies)
        wait_until(lambda: len(latencies) > answered + 20, timeout=WAIT, what="answers after the ejection")
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
        paused.unpause()
    assert row["probes"][0]["failure_streak"] < 3, "the probes took it out first"
    assert failures == [], f"requests failed: {failures}"
    assert max(latencies) < 20, f"a request waited {max(latencies):.1f}s on the paused replica"
    assert cli(capsys, "stop", "sleeper").code == 0
