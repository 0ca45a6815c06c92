"""Docker restarts while a service runs (issue: hardening, item 2).

Starts a 2-replica service, stops dockerd (SIGTERM, as `systemctl stop docker` does), checks
that `ps` stays usable and reports the engine problem, starts dockerd again, and measures how
long until every replica is ready and the endpoint answers again. Checks: no traceback in the
agent's log, no container of the service left that `ps` does not show, no duplicate.

    .venv/bin/python bench/docker_restart.py [--trials 3] [--json]

Needs root and a dockerd this script may stop and start (it restarts it the way
scripts/setup.sh does). Do not run it while other work uses the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

DSTACKCTL = str(Path(sys.executable).parent / "dstackctl")
DOCKERD_LOG = "/var/log/dstackctl-dockerd.log"
SERVICE = """type: service
name: restartsvc
image: dstackctl-testsrv:latest
commands:
  - httpd -f -p 8000 -h /www
port: "{port}:8000"
replicas: 2
probes:
  - {{type: http, url: /cgi-bin/health, interval: 1s}}
"""


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.1)
    raise SystemExit(f"docker_restart: timed out after {timeout:g}s waiting for {what}")


def docker_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def dockerd_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def ps_json(env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [DSTACKCTL, "ps", "restartsvc", "--json"], env=env, capture_output=True, text=True
    )
    return json.loads(result.stdout) if result.returncode == 0 else {}


def all_ready(env: dict[str, str]) -> bool:
    runs = ps_json(env).get("runs") or [{}]
    replicas = runs[0].get("replicas") or []
    return len(replicas) == 2 and all(r["status"] == "running" and r["ready"] for r in replicas)


def endpoint_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def trial(env: dict[str, str], port: int, home: Path) -> dict[str, Any]:
    before = {r["container_id"] for r in ps_json(env)["runs"][0]["replicas"]}
    for pid in dockerd_pids():
        os.kill(pid, 15)
    down = wait(lambda: not dockerd_pids(), 60, "dockerd to exit")
    problem_seen = wait(
        lambda: (
            bool((ps_json(env).get("runs") or [{}])[0].get("agent_alive") is not None)
            and "Docker" in subprocess.run([DSTACKCTL, "ps"], env=env, capture_output=True, text=True).stderr
        ),
        30,
        "ps to report the Docker problem",
    )
    ps_exit = subprocess.run([DSTACKCTL, "ps", "-v"], env=env, capture_output=True).returncode
    started = time.monotonic()
    with open(DOCKERD_LOG, "ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    wait(docker_up, 60, "dockerd to answer")
    ready = wait(lambda: all_ready(env), 120, "every replica ready again")
    serving = wait(lambda: endpoint_ok(port), 30, "the endpoint to answer")
    after = {r["container_id"] for r in ps_json(env)["runs"][0]["replicas"]}
    labelled = subprocess.run(
        ["docker", "ps", "-aq", "--no-trunc", "--filter", "label=dstackctl.run=restartsvc"],
        capture_output=True,
        text=True,
    ).stdout.split()
    log_text = (home / "services" / "restartsvc" / "agent.log").read_text()
    if "Traceback" in log_text:  # show where, for the report
        start = log_text.index("Traceback")
        print(log_text[max(0, start - 300) : start + 2500], file=sys.stderr)
    return {
        "dockerd_down_s": round(down, 2),
        "ps_reports_problem_s": round(problem_seen, 2),
        "ps_exit_while_down": ps_exit,
        "ready_again_s": round(time.monotonic() - started, 2),
        "ready_after_ready_wait_s": round(ready, 2),
        "endpoint_after_s": round(serving, 2),
        "same_containers": before == after,
        "orphans": sorted(set(labelled) - after),
        "tracebacks_in_agent_log": log_text.count("Traceback"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        print("docker_restart: needs root and dockerd", file=sys.stderr)
        return 2
    home = Path(tempfile.mkdtemp(prefix="dstackctl-restart-"))
    env = {**os.environ, "DSTACKCTL_HOME": str(home)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = home / "restartsvc.dstack.yml"
    config.write_text(SERVICE.format(port=port))
    results = []
    try:
        subprocess.run([DSTACKCTL, "run", "-d", "--timeout", "2m", str(config)], env=env, check=True)
        for _ in range(args.trials):
            results.append(trial(env, port, home))
    finally:
        if not docker_up():
            with open(DOCKERD_LOG, "ab") as log:
                subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
            wait(docker_up, 60, "dockerd to answer")
        subprocess.run([DSTACKCTL, "stop", "--all"], env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
    passed = all(
        r["ps_exit_while_down"] == 0 and not r["orphans"] and r["tracebacks_in_agent_log"] == 0
        for r in results
    )
    if args.json:
        print(json.dumps({"trials": results, "result": "PASS" if passed else "FAIL"}, indent=2))
    else:
        for number, result in enumerate(results, 1):
            print(f"trial {number}: {result}")
        median = statistics.median(r["ready_again_s"] for r in results)
        print(f"ready again after dockerd start: median {median:.1f}s")
        print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
