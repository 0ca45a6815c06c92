"""Agent crashes under load: `kill -9` of a service's agent while 50 clients send requests.

One service of the test image (2 replicas, an http probe every second, ready after 2) is
started with the real console script in a temporary DSTACKCTL_HOME. --clients threads each
send GETs on a keep-alive connection (a new one after an error). Every --every seconds the
agent (the pid in agent.lock; its supervisor restarts it) gets SIGKILL, --kills times. Per kill:

- failed: requests that ended in an error or a non-200 between this kill and the next; only
  the requests in flight at the kill should fail (at most one per client);
- serve again: from the kill until the first request sent after it is answered 200 (requests
  sent meanwhile wait in the endpoint's backlog, which the supervisor keeps open);
- restart: from the kill until agent.lock names a new agent.

Targets: failed per kill at most --clients, serve-again median at most 1 s, the same containers
at the end (nothing replaced or duplicated), the service stopped cleanly.

    .venv/bin/python bench/agent_crash_load.py [--kills 10] [--clients 50] [--every 4] [--json]

Exit status: 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _report import load_average
from autoscale import DSTACKCTL, IMAGE, free_port

from dstackctl.store import Store

NAME = "crashload"
SERVICE = """type: service
name: {name}
image: {image}
port: "{port}:8000"
replicas: 2
commands: ["exec httpd -f -p 8000 -h /www"]
probes: [{{type: http, url: /, interval: 1s, ready_after: 2}}]
"""


@dataclass
class Request:
    sent: float
    ended: float
    ok: bool


@dataclass
class Kill:
    at: float
    pid: int
    restart_s: float | None = None
    serve_again_s: float | None = None
    failed: int = 0


@dataclass
class Clients:
    port: int
    count: int
    requests: list[Request] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.count)]
        for thread in threads:
            thread.start()
        return threads

    def _client(self) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self.stop.is_set():
            connection = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            sent = time.monotonic()
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = None
            with self.lock:
                self.requests.append(Request(sent, time.monotonic(), ok))
            if not ok:
                time.sleep(0.05)  # a refused connect would otherwise spin


def dstackctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DSTACKCTL_HOME": str(home)}
    return subprocess.run([DSTACKCTL, *args], env=env, capture_output=True, text=True, check=False)


def container_ids(home: Path) -> set[str]:
    shown = json.loads(dstackctl(home, "ps", NAME, "--json").stdout)
    return {r["container_id"] for r in shown["runs"][0]["replicas"]}


def wait_for_new_agent(store: Store, old: int, timeout: float = 30.0) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        processes = store.agent_processes(NAME)
        if len(processes) == 2 and processes[0] != old:
            return time.monotonic()
        time.sleep(0.005)
    return None


def measure(kills: list[Kill], requests: list[Request]) -> None:
    for index, kill in enumerate(kills):
        until = kills[index + 1].at if index + 1 < len(kills) else float("inf")
        kill.failed = sum(1 for r in requests if kill.at <= r.ended < until and not r.ok)
        answered = [r.ended for r in requests if r.sent >= kill.at and r.ok and r.ended < until]
        kill.serve_again_s = (min(answered) - kill.at) if answered else None


def run_bench(args: argparse.Namespace, home: Path) -> dict[str, object]:
    port = free_port()
    path = home / "service.yml"
    path.write_text(SERVICE.format(name=NAME, image=IMAGE, port=port))
    started = dstackctl(home, "run", "-d", "--timeout", "120s", str(path))
    if started.returncode != 0:
        raise SystemExit(f"run -d failed: {started.stderr}")
    store = Store(home)
    before = container_ids(home)
    clients = Clients(port, args.clients)
    threads = clients.run()
    kills: list[Kill] = []
    time.sleep(args.every)  # steady load first: the kills are faults injected at set times
    for _ in range(args.kills):
        pid = store.agent_processes(NAME)[0]
        kill = Kill(time.monotonic(), pid)
        os.kill(pid, signal.SIGKILL)
        restarted = wait_for_new_agent(store, pid)
        kill.restart_s = restarted - kill.at if restarted else None
        kills.append(kill)
        time.sleep(max(0.0, kill.at + args.every - time.monotonic()))
    clients.stop.set()
    for thread in threads:
        thread.join(35)
    measure(kills, clients.requests)
    after = container_ids(home)
    stopped = dstackctl(home, "stop", NAME)
    return report(args, kills, clients.requests, before == after, stopped.returncode == 0)


def report(
    args: argparse.Namespace, kills: list[Kill], requests: list[Request], same: bool, stopped: bool
) -> dict[str, object]:
    serve = [k.serve_again_s for k in kills if k.serve_again_s is not None]
    restart = [k.restart_s for k in kills if k.restart_s is not None]
    failed_max = max((k.failed for k in kills), default=0)
    verdict = (
        len(serve) == len(kills) == len(restart)
        and failed_max <= args.clients
        and statistics.median(serve) <= 1.0
        and same
        and stopped
    )
    return {
        "clients": args.clients,
        "kills": [asdict(k) | {"at": None} for k in kills],
        "requests": len(requests),
        "failed": sum(1 for r in requests if not r.ok),
        "failed_per_kill_max": failed_max,
        "serve_again_median_s": statistics.median(serve) if serve else None,
        "serve_again_max_s": max(serve) if serve else None,
        "restart_median_s": statistics.median(restart) if restart else None,
        "same_containers": same,
        "stopped_cleanly": stopped,
        "load_average": load_average(),
        "verdict": "PASS" if verdict else "FAIL",
    }


def print_table(result: dict[str, object]) -> None:
    print(f"{'kill':>4} {'pid':>8} {'restart s':>10} {'serve again s':>14} {'failed':>7}")
    for index, kill in enumerate(result["kills"], 1):  # type: ignore[arg-type]
        restart = f"{kill['restart_s']:.3f}" if kill["restart_s"] is not None else "-"
        serve = f"{kill['serve_again_s']:.3f}" if kill["serve_again_s"] is not None else "-"
        print(f"{index:>4} {kill['pid']:>8} {restart:>10} {serve:>14} {kill['failed']:>7}")
    for key in ("clients", "requests", "failed", "failed_per_kill_max", "serve_again_median_s"):
        print(f"{key}: {result[key]}")
    for key in ("serve_again_max_s", "restart_median_s", "same_containers", "stopped_cleanly"):
        print(f"{key}: {result[key]}")
    print(f"load average: {result['load_average']}")
    print(result["verdict"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--every", type=float, default=4.0, help="seconds between kills")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crashload-") as directory:
        home = Path(directory)
        try:
            result = run_bench(args, home)
        finally:
            dstackctl(home, "stop", NAME)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0 if result["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
